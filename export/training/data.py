"""Training data: read an IDX(.gz) file or an image folder, split off validation, digest.

The last ``val_count`` images are the validation split and never seen in training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentserve.errors import InvalidInput
from latentserve.worker.runtime.images import load_images

DEFAULT_VAL_COUNT = 1000


@dataclass(frozen=True)
class Dataset:
    """uint8 (N, C, H, W) training and validation images, and where they came from."""

    train: np.ndarray
    val: np.ndarray
    source: str
    sha256: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.shape[1:]
        return int(c), int(h), int(w)


def images_sha256(images: np.ndarray) -> str:
    """Digest of a uint8 image array, shape included (what a model was trained on)."""
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    h.update(np.ascontiguousarray(images, np.uint8).tobytes())
    return h.hexdigest()


def resolve_data_path(path: str | Path) -> Path:
    """A file, a folder of images, or a folder holding one ``*images*idx*`` file."""
    p = Path(path)
    if not p.exists():
        raise InvalidInput(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        idx = sorted(p.glob("*images*idx*"))
        if idx:
            return idx[0]
    return p


def split(images: np.ndarray, *, val_count: int = DEFAULT_VAL_COUNT,
          train_limit: int | None = None, source: str = "array") -> Dataset:
    """Last ``val_count`` images -> validation; the first ``train_limit`` of the rest ->
    training."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InvalidInput(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    if not 0 < val_count < len(images):
        raise InvalidInput(f"val_count {val_count} must be in 1..{len(images) - 1} "
                           f"for {len(images)} images")
    train, val = images[:-val_count], images[-val_count:]
    if train_limit is not None:
        if train_limit < 1:
            raise InvalidInput(f"train_limit must be >= 1, got {train_limit}")
        train = train[:train_limit]
    return Dataset(train=train, val=val, source=source, sha256=images_sha256(train))


def load_dataset(path: str | Path, *, val_count: int = DEFAULT_VAL_COUNT,
                 train_limit: int | None = None) -> Dataset:
    """Read images from ``path`` (IDX(.gz), image folder or a folder with an IDX file) and split."""
    p = resolve_data_path(path)
    return split(load_images(p), val_count=val_count, train_limit=train_limit, source=str(p))
