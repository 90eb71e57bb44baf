"""The shipped MNIST sample classifier, and the train -> ONNX export path that made it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from latentserve.worker.runtime.images import read_idx

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "classifiers" / "mnist-classifier" / "1"
DATA = ROOT.parent / "shared" / "data" / "mnist"


def _labels(path: Path) -> np.ndarray:
    import gzip

    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=8)


@pytest.fixture(scope="module")
def validation() -> tuple[np.ndarray, np.ndarray]:
    if not (DATA / "labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"MNIST labels not found under {DATA}")
    images = read_idx(DATA / "images-idx3-ubyte.gz")
    labels = _labels(DATA / "labels-idx1-ubyte.gz")
    return images[-1000:], labels[-1000:]


def test_shipped_classifier_accuracy_on_validation_split(
        validation: tuple[np.ndarray, np.ndarray]) -> None:
    from latentserve.eval.samples import Classifier

    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    onnx_path = SHIPPED / manifest["files"]["classifier"]["path"]
    assert hashlib.sha256(onnx_path.read_bytes()).hexdigest() == \
        manifest["files"]["classifier"]["sha256"]
    clf = Classifier.load(SHIPPED)
    images, labels = validation
    acc = float((clf.predict(images).argmax(axis=1) == labels).mean())
    assert acc >= 0.97
    assert acc == pytest.approx(manifest["quality"]["val_accuracy"], abs=1e-4)


def test_classifier_is_not_listed_as_a_servable_model(tmp_path: Path) -> None:
    from latentserve.worker.runtime.repository import ModelRepository

    # the repository lists models/*/*/manifest.json; the classifier sits one level deeper
    names = ModelRepository(ROOT / "models").names()
    assert "mnist-classifier" not in names and "classifiers" not in names


@pytest.mark.slow
def test_train_and_export_round_trip(tmp_path: Path,
                                     validation: tuple[np.ndarray, np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from latentserve.export.nets.classifier import (
        ClassifierConfig,
        onnx_logits,
        train_classifier,
        write_classifier,
    )

    images, labels = validation
    config = ClassifierConfig(epochs=3, batch_size=32)
    model = train_classifier(images[:512], labels[:512], config)
    manifest = write_classifier(model, tmp_path / "1", val_images=images[512:],
                                val_labels=labels[512:], config=config, train_size=512)
    assert manifest["family"] == "classifier" and manifest["version"] == 1
    onnx_path = tmp_path / "1" / "classifier.onnx"
    assert manifest["files"]["classifier"]["sha256"] == \
        hashlib.sha256(onnx_path.read_bytes()).hexdigest()  # type: ignore[index]
    for n in (1, 7):  # the batch axis is dynamic
        with torch.no_grad():
            want = model(torch.from_numpy(images[:n])).numpy()
        np.testing.assert_allclose(onnx_logits(onnx_path, images[:n]), want, atol=1e-4)
    # three short epochs on 512 images already beat chance (0.1) by far
    assert 0.5 < manifest["quality"]["val_accuracy"] <= 1.0  # type: ignore[index]
