"""Model fixtures: ``tiny_repo`` (tiny trained models exported to ONNX) and ``mnist_images``.

``tiny_repo`` trains ``tiny-ae``, ``tiny-vae`` and
``tiny-vqvae`` (1 x 28 x 28) for a few dozen steps on a few hundred MNIST images and
exports them with the real exporter (version 1 each) into a temporary repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist" / "images-idx3-ubyte.gz"
EXAMPLES = ROOT / "examples" / "digits"
TINY_TRAIN = 300


def load_mnist() -> np.ndarray | None:
    """All MNIST images of ../shared/data (uint8 (N, 1, 28, 28)), or None without it."""
    if not MNIST.is_file():
        return None
    from latentserve.worker.runtime.images import read_idx

    return read_idx(MNIST)


@pytest.fixture(scope="session")
def mnist_images() -> np.ndarray:
    """uint8 (N, 1, 28, 28): the validation split (last 1000) or the shipped example PNGs."""
    images = load_mnist()
    if images is not None:
        return images[-1000:]
    from latentserve.worker.runtime.images import load_images

    if not EXAMPLES.is_dir():
        pytest.skip(f"neither {MNIST} nor {EXAMPLES} exists")
    return load_images(EXAMPLES, (1, 28, 28))


def tiny_configs(family: str, image_shape: tuple[int, int, int] = (1, 28, 28)):  # type: ignore[no-untyped-def]
    """(ModelConfig, TrainConfig, PriorConfig | None) of a tiny, fast model."""
    from latentserve.export.nets.models import ModelConfig
    from latentserve.export.nets.prior import PriorConfig
    from latentserve.export.training.train import TrainConfig

    mc = ModelConfig(family=family, image_shape=image_shape, hidden=16, res_blocks=0,
                     latent_channels=4, num_codes=32, code_dim=8)
    tc = TrainConfig(steps=60, batch_size=32, lr=5e-3, seed=0, prior_steps=30, progress=False)
    pc = (PriorConfig(num_codes=32, grid=mc.grid, embed_dim=16, hidden=32, layers=1)
          if family == "vqvae" else None)
    return mc, tc, pc


def build_tiny_repo(root: Path, images: np.ndarray) -> Path:
    """Train and export the three tiny models into ``root``; returns ``root``."""
    import torch

    from latentserve.export.publish.exporter import export_checkpoint
    from latentserve.export.training.data import split
    from latentserve.export.training.train import train_model

    torch.set_num_threads(1)
    data = split(images, val_count=min(1000, len(images) // 4),
                 train_limit=TINY_TRAIN, source="mnist")
    for family in ("ae", "vae", "vqvae"):
        mc, tc, pc = tiny_configs(family)
        ckpt = train_model(mc, tc, data, prior_config=pc)
        export_checkpoint(ckpt, repo=root, name=f"tiny-{family}", version=1, data=data,
                          gmm_components=3)
    return root


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, mnist_images: np.ndarray) -> Path:
    """A model repository with ``tiny-ae``, ``tiny-vae``, ``tiny-vqvae`` (version 1 each)."""
    images = load_mnist()
    if images is None:
        images = mnist_images
    return build_tiny_repo(tmp_path_factory.mktemp("tiny_repo"), images)


def build_photo_repo(root: Path, *, n: int = 8, m: int = 8) -> Path:
    """A repository with ``tiny-photo`` (RGB), ``tiny-photo-grey`` (L) and
    ``tiny-photo-hyper`` (RGB, a scale hyperprior with 4 z channels: code kind 5, the
    exact layout): any-size photo codecs (export/nets/photo.py) of width ``n``/``m``,
    untrained (seeded), exported through the real any-size exporter. Their pixels mean
    nothing; their codes, sizes and refusals are what the tests check."""
    import torch

    from latentserve.export.nets.photo import PhotoCodec, PhotoConfig
    from latentserve.export.publish.photo import export_photo

    rng = np.random.default_rng(0)
    for name, channels, hyper in (("tiny-photo", 3, 0), ("tiny-photo-grey", 1, 0),
                                  ("tiny-photo-hyper", 3, 4)):
        torch.manual_seed(0)
        net = PhotoCodec(PhotoConfig(channels=channels, n=n, m=m, hyper=hyper))
        if hyper:  # untrained latents sit near 0: spread them so y and z carry symbols
            with torch.no_grad():
                net.g_a[-1].weight.mul_(40.0)
                net.h_a[-1].weight.mul_(30.0)
                net.h_s[-1].weight.mul_(10.0)
        fit = rng.integers(0, 256, (4, channels, 64, 64), dtype=np.uint8)
        val = [rng.integers(0, 256, (channels, 17, 33), dtype=np.uint8)]
        check = rng.integers(0, 256, (2, channels, 48, 64), dtype=np.uint8)
        export_photo(net, repo=root, name=name, version=1, fit_images=fit, val_images=val,
                     check_images=check, source={"kind": "test"})
    return root


@pytest.fixture(scope="session")
def photo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``build_photo_repo`` in a session temp folder."""
    return build_photo_repo(tmp_path_factory.mktemp("photo_repo"))
