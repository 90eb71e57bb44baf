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
    # a fresh export carries the features output the eval's FID reads
    from latentserve.eval.samples import Classifier

    assert manifest["onnx"]["features"] == "features"  # type: ignore[index]
    with torch.no_grad():
        want_feats = model.features(torch.from_numpy(images[:5])).numpy()
    np.testing.assert_allclose(Classifier.load(tmp_path / "1").features(images[:5]),
                               want_feats, atol=1e-4)
    # three short epochs on 512 images already beat chance (0.1) by far
    assert 0.5 < manifest["quality"]["val_accuracy"] <= 1.0  # type: ignore[index]


def test_shipped_classifier_features(validation: tuple[np.ndarray, np.ndarray]) -> None:
    from latentserve.eval.fid import fid
    from latentserve.eval.samples import Classifier

    clf = Classifier.load(SHIPPED)
    assert clf.has_features
    images, labels = validation
    probs, feats = clf.predict_with_features(images)
    assert feats.shape == (1000, 64) and feats.dtype == np.float64
    assert (feats >= 0).all()  # after fc1's ReLU
    # the features output does not change the predictions: same as the logits-only run
    np.testing.assert_array_equal(probs, clf.predict(images))
    np.testing.assert_array_equal(clf.features(images[:7]), feats[:7])
    # real digits are far closer to real digits than noise is
    train = read_idx(DATA / "images-idx3-ubyte.gz")[:1000]
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1, 28, 28), dtype=np.uint8)
    floor = fid(clf.features(train), feats)
    assert floor < 0.1 * fid(clf.features(noise), feats)


def test_adding_the_features_output_keeps_logits_bit_identical(
        tmp_path: Path, validation: tuple[np.ndarray, np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    import onnxruntime as ort

    from latentserve.export.nets.classifier import (
        MnistClassifier,
        add_features_output,
        export_onnx,
        onnx_logits,
    )

    torch.manual_seed(0)
    model = MnistClassifier().eval()
    path = tmp_path / "classifier.onnx"
    export_onnx(model, path, features=False)  # what the shipped file was exported as
    images = validation[0][:300]
    before = onnx_logits(path, images)
    digest = add_features_output(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert add_features_output(path) == digest  # a second call leaves the file as is
    np.testing.assert_array_equal(onnx_logits(path, images), before)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "features"]
    feats = sess.run(["features"], {"image": images})[0]
    with torch.no_grad():
        want = model.features(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(feats, want, atol=1e-4)
