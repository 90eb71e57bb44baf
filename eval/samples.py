"""Sample quality: a small MNIST classifier scores what each model's sampler draws.

Three numbers per model, from the classifier's softmax over 10 digit classes and its
penultimate activations:

- ``confident_share``: the share of samples whose top class has probability >= 0.9
  (a sample that looks like a digit at all);
- ``class_entropy_bits``: the entropy of the histogram of predicted classes, in bits
  (diversity: log2(10) = 3.32 when every digit is drawn equally often, 0 when the
  sampler collapses onto one digit);
- ``fid``: the Frechet distance (``eval/fid.py``) between the Gaussians fitted to the
  classifier's 64 penultimate features of the samples and of the reference images (the
  images ``latentserve eval`` was given: the validation split), beside the floor that
  real training images of the same count reach against the same references. It sees
  what the other two miss (blur, stroke width, style spread); it is an MNIST FID, not
  comparable with Inception-FID.

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
    """The exported classifier: uint8 (N, 1, 28, 28) -> class probabilities (N, 10) and,
    where the manifest names that output, penultimate features (N, D)."""

    def __init__(self, session: Any, manifest: dict[str, Any]) -> None:
        self.session = session
        self.manifest = manifest
        onnx_info = manifest.get("onnx", {})
        self.input_name = str(onnx_info.get("input", "image"))
        self.logits_name = str(onnx_info.get("output", "logits"))
        # None for a classifier exported before the features output existed
        features = onnx_info.get("features")
        self.features_name = None if features is None else str(features)
        names = {o.name for o in session.get_outputs()}
        for name in (self.logits_name, self.features_name):
            if name is not None and name not in names:
                raise ModelIntegrityError(
                    f"the classifier manifest names ONNX output {name!r}, the graph has "
                    f"{sorted(names)}")
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

    @property
    def has_features(self) -> bool:
        return self.features_name is not None

    def _check(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.image_shape:
            raise InvalidInput(f"the classifier takes uint8 images (N, "
                               f"{', '.join(map(str, self.image_shape))}); got "
                               f"{images.dtype} {tuple(images.shape)}")

    def _run(self, images: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        self._check(images)
        parts = [self.session.run(outputs, {self.input_name:
                                            np.ascontiguousarray(images[i:i + 1024])})
                 for i in range(0, len(images), 1024)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, 10) for uint8 images (N, 1, 28, 28)."""
        self._check(images)
        if len(images) == 0:
            return np.zeros((0, NUM_CLASSES), np.float64)
        return _softmax(self._run(images, [self.logits_name])[0])

    def predict_with_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, 10), penultimate features (N, D) float64) from one pass."""
        if self.features_name is None:
            raise ModelIntegrityError(
                "this classifier has no features output (its manifest names none under "
                "onnx.features); add it with scripts/add_classifier_features.py")
        logits, feats = self._run(images, [self.logits_name, self.features_name])
        return _softmax(logits), feats.astype(np.float64)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate features (N, D) float64 for uint8 images (N, 1, 28, 28)."""
        return self.predict_with_features(images)[1]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
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
    # Frechet distance in classifier features to the reference images; None without them
    fid: float | None = None
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


@dataclass
class FidFloor:
    """What real images reach: ``count`` training images against the references."""

    count: int
    reference_count: int
    fid: float
    confident_share: float
    class_entropy_bits: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class FidReference:
    """The reference images' features, fitted once; FIDs of any image set against them."""

    def __init__(self, classifier: Classifier, images: np.ndarray) -> None:
        from latentserve.eval.fid import gaussian_stats

        if len(images) < 2:
            raise InvalidInput(f"the FID needs at least 2 reference images, got {len(images)}")
        self.classifier = classifier
        self.count = len(images)
        self.mu, self.cov = gaussian_stats(classifier.features(images))

    def fid_of_features(self, features: np.ndarray) -> float:
        from latentserve.eval.fid import frechet_distance, gaussian_stats

        return frechet_distance(*gaussian_stats(features), self.mu, self.cov)

    def floor(self, real: np.ndarray) -> FidFloor:
        """Score real images (not among the references) as if they were samples."""
        probs, feats = self.classifier.predict_with_features(real)
        confident, entropy, _, _ = score(probs)
        return FidFloor(count=len(real), reference_count=self.count,
                        fid=self.fid_of_features(feats), confident_share=confident,
                        class_entropy_bits=entropy)


def evaluate_samples(pipeline: Any, refs: Sequence[str], classifier: Classifier, *,
                     count: int, out_dir: str | Path, seed: int = 0,
                     temperature: float = 1.0,
                     reference: FidReference | None = None) -> list[SampleQuality]:
    """Draw ``count`` samples from each model, score them (and their FID against
    ``reference`` when given), write ``samples-<name>.png``."""
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
        fid = None
        if reference is not None and len(samples) >= 2:
            probs, feats = classifier.predict_with_features(samples)
            fid = reference.fid_of_features(feats)
        else:
            probs = classifier.predict(samples)
        confident, entropy, hist, mean_conf = score(probs)
        grid = out_dir / f"samples-{manifest.name}.png"
        save_grid(samples, grid)
        results.append(SampleQuality(
            model=manifest.ref, family=manifest.family, count=count,
            confident_share=confident, class_entropy_bits=entropy, class_histogram=hist,
            mean_confidence=mean_conf, samples_per_s=count / max(seconds, 1e-9),
            grid=grid.name, fid=fid))
    return results
