"""Sample quality: a small MNIST classifier scores what each model's sampler draws.

Two numbers per model, from the classifier's softmax over 10 digit classes:

- ``confident_share``: the share of samples whose top class has probability >= 0.9
  (a sample that looks like a digit at all);
- ``class_entropy_bits``: the entropy of the histogram of predicted classes, in bits
  (diversity: log2(10) = 3.32 when every digit is drawn equally often, 0 when the
  sampler collapses onto one digit).

Plus a grid PNG of the first 100 samples. The classifier is an ONNX file with a small
manifest (``models/classifiers/mnist-classifier/1/``, made by ``export/nets/classifier.py``),
run on onnxruntime's CPU provider like everything else on the serving side.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentserve.errors import InvalidInput, ModelIntegrityError, ModelNotFound
from latentserve.worker.runtime.manifest import sha256_file

CONFIDENCE = 0.9
NUM_CLASSES = 10
# Where the classifier lives relative to a model repository's root.
CLASSIFIER_SUBPATH = Path("classifiers") / "mnist-classifier" / "1"


class Classifier:
    """The exported classifier: uint8 (N, 1, 28, 28) -> class probabilities (N, 10)."""

    def __init__(self, session: Any, manifest: dict[str, Any]) -> None:
        self.session = session
        self.manifest = manifest
        self.input_name = str(manifest.get("onnx", {}).get("input", "image"))
        image = manifest.get("image", {})
        self.image_shape = (int(image.get("channels", 1)), int(image.get("height", 28)),
                            int(image.get("width", 28)))

    @classmethod
    def load(cls, folder: str | Path) -> Classifier:
        """Read ``folder/manifest.json``, verify the ONNX file's sha256, open a CPU session."""
        import onnxruntime as ort

        folder = Path(folder)
        mpath = folder / "manifest.json"
        if not mpath.is_file():
            raise ModelNotFound(
                f"no classifier manifest at {mpath}; train one with scripts/train_classifier.py "
                f"or pass --classifier DIR")
        manifest = json.loads(mpath.read_text())
        if manifest.get("family") != "classifier":
            raise ModelIntegrityError(
                f"{mpath} has family {manifest.get('family')!r}, expected 'classifier'")
        entry = manifest["files"]["classifier"]
        path = folder / entry["path"]
        if not path.is_file():
            raise ModelIntegrityError(f"classifier file {path} named by {mpath} is missing")
        if sha256_file(path) != entry["sha256"]:
            raise ModelIntegrityError(f"{path} does not match the sha256 in {mpath}; re-export it")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        return cls(session, manifest)

    @property
    def val_accuracy(self) -> float | None:
        value = self.manifest.get("quality", {}).get("val_accuracy")
        return None if value is None else float(value)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, 10) for uint8 images (N, 1, 28, 28)."""
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.image_shape:
            raise InvalidInput(f"the classifier takes uint8 images (N, "
                               f"{', '.join(map(str, self.image_shape))}); got "
                               f"{images.dtype} {tuple(images.shape)}")
        if len(images) == 0:
            return np.zeros((0, NUM_CLASSES), np.float64)
        logits = np.concatenate([
            self.session.run(None, {self.input_name: np.ascontiguousarray(images[i:i + 1024])})[0]
            for i in range(0, len(images), 1024)]).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        probs: np.ndarray = p / p.sum(axis=1, keepdims=True)
        return probs


@dataclass
class SampleQuality:
    """Scores of one model's samples."""

    model: str
    family: str
    count: int
    confident_share: float
    class_entropy_bits: float
    class_histogram: list[int]
    mean_confidence: float
    samples_per_s: float
    grid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


def class_entropy_bits(predicted: np.ndarray, classes: int = NUM_CLASSES) -> float:
    """Entropy in bits of the histogram of predicted class ids."""
    hist = np.bincount(predicted, minlength=classes).astype(np.float64)
    if hist.sum() == 0:
        return 0.0
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


def score(probs: np.ndarray) -> tuple[float, float, list[int], float]:
    """(confident share, class entropy bits, class histogram, mean top probability)."""
    top = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    return (float((top >= CONFIDENCE).mean()) if len(top) else 0.0,
            class_entropy_bits(pred, probs.shape[1]),
            np.bincount(pred, minlength=probs.shape[1]).tolist(),
            float(top.mean()) if len(top) else 0.0)


def save_grid(images: np.ndarray, path: str | Path, *, columns: int = 10, scale: int = 2,
              gap: int = 2) -> None:
    """Tile up to ``columns**2`` uint8 images (N, C, H, W) into one PNG, grey gaps between."""
    from PIL import Image

    images = images[:columns * columns]
    n, c, h, w = images.shape
    rows = max(1, -(-n // columns))
    canvas = np.full((c, rows * (h + gap) + gap, columns * (w + gap) + gap), 128, np.uint8)
    for i, img in enumerate(images):
        y, x = divmod(i, columns)
        canvas[:, gap + y * (h + gap):gap + y * (h + gap) + h,
               gap + x * (w + gap):gap + x * (w + gap) + w] = img
    arr = canvas[0] if c == 1 else canvas.transpose(1, 2, 0)
    pil = Image.fromarray(arr)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    pil.save(str(path), format="PNG", optimize=True)


def evaluate_samples(pipeline: Any, refs: Sequence[str], classifier: Classifier, *,
                     count: int, out_dir: str | Path, seed: int = 0,
                     temperature: float = 1.0) -> list[SampleQuality]:
    """Draw ``count`` samples from each model, score them, write ``samples-<name>.png``."""
    if count < 1:
        raise InvalidInput(f"--samples must be >= 1, got {count}")
    out_dir = Path(out_dir)
    results = []
    for ref in refs:
        runtime = pipeline.runtime(ref)
        manifest = runtime.manifest
        if tuple(manifest.image_shape) != classifier.image_shape:
            raise InvalidInput(
                f"model {manifest.ref} makes {manifest.image_shape} images; the classifier "
                f"takes {classifier.image_shape}")
        t0 = time.perf_counter()
        samples = pipeline.sample(ref, count, seed=seed, temperature=temperature)
        seconds = time.perf_counter() - t0
        confident, entropy, hist, mean_conf = score(classifier.predict(samples))
        grid = out_dir / f"samples-{manifest.name}.png"
        save_grid(samples, grid)
        results.append(SampleQuality(
            model=manifest.ref, family=manifest.family, count=count,
            confident_share=confident, class_entropy_bits=entropy, class_histogram=hist,
            mean_confidence=mean_conf, samples_per_s=count / max(seconds, 1e-9),
            grid=grid.name))
    return results
