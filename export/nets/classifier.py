"""The MNIST classifier that scores generated samples (``latentserve eval --samples``).

A small CNN trained on the training split (every image but the last 1000 of the IDX
set), exported to ONNX beside a small manifest into
``models/classifiers/mnist-classifier/1/``. It lives outside ``models/<name>/<version>``
on purpose: the model repository lists every ``models/*/*/manifest.json`` as a servable
model, and a classifier is not one.

ONNX contract: input ``image`` uint8 (N, 1, 28, 28) -> output ``logits`` float32 (N, 10);
the x/255 scaling happens in the graph, as for the encoders.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

CLASSIFIER_NAME = "mnist-classifier"
ONNX_FILE = "classifier.onnx"
# The project's validation split: the last 1000 images of the IDX set.
VALIDATION_SIZE = 1000
# The dynamo exporter implements opset 18 natively; asking for less converts afterwards.
OPSET = 18
# MNIST's pixel mean and std on [0, 1]; applied in-graph so callers feed raw uint8.
_MEAN, _STD = 0.1307, 0.3081


class MnistClassifier(nn.Module):
    """uint8 (N,1,28,28) -> /255, normalise -> [conv3x3 16, relu, pool] -> [conv3x3 32,
    relu, pool] -> flatten 32*7*7 -> fc 64, relu, dropout -> fc 10 = logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)
        self.drop = nn.Dropout(0.25)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.to(torch.float32) / 255.0 - _MEAN) / _STD
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.drop(F.relu(self.fc1(x.flatten(1))))
        logits: torch.Tensor = self.fc2(x)
        return logits


@dataclass(frozen=True)
class ClassifierConfig:
    """Training settings; saved into the manifest so a run can be repeated."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 2  # random translation in pixels, the only augmentation
    seed: int = 0


def split(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, val_x, val_y): validation is the last 1000 images."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) <= VALIDATION_SIZE:
        raise ValueError(f"need more than {VALIDATION_SIZE} images to split, got {len(images)}")
    cut = len(images) - VALIDATION_SIZE
    return images[:cut], labels[:cut], images[cut:], labels[cut:]


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Read an IDX1 label file (optionally .gz) into uint8 (N,)."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[:4] != b"\0\0\x08\x01":
        raise ValueError(f"{path} is not an IDX1 uint8 label file (bad magic)")
    n = int.from_bytes(data[4:8], "big")
    if len(data) != 8 + n:
        raise ValueError(f"{path}: header says {n} labels, file holds {len(data) - 8}")
    return np.frombuffer(data, np.uint8, offset=8).copy()


def _shift(batch: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill): MNIST is centred,
    samples from a generator are not always, so the classifier should not care."""
    if max_shift == 0:
        return batch
    n = batch.shape[0]
    pad = F.pad(batch, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    h, w = batch.shape[-2:]
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def train_classifier(images: np.ndarray, labels: np.ndarray,
                     config: ClassifierConfig = ClassifierConfig(), *,
                     log: bool = False) -> MnistClassifier:
    """Train on uint8 (N,1,28,28) images and int labels; returns the model in eval mode."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = MnistClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.epochs * -(-len(images) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels.astype(np.int64))
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(images), generator=gen)
        total, t0 = 0.0, time.perf_counter()
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            x = _shift(x_all[idx], config.max_shift, gen)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log:
            print(f"epoch {epoch + 1}/{config.epochs}: loss {total / len(images):.4f} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    model.eval()
    return model


def export_onnx(model: MnistClassifier, path: str | Path) -> None:
    """Write the model as one self-contained ONNX file with a dynamic batch axis."""
    import contextlib
    import io
    import warnings

    model.eval()
    example = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    batch = torch.export.Dim("N", min=1)
    # The exporter prints progress and raises deprecation noise from inside torch's own
    # pytree code; neither says anything about this model, and tests treat warnings as errors.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), input_names=["image"],
                          output_names=["logits"], opset_version=OPSET, dynamo=True,
                          external_data=False, dynamic_shapes={"image": {0: batch}},
                          verbose=False)


def onnx_logits(path: str | Path, images: np.ndarray) -> np.ndarray:
    """Run the exported classifier with onnxruntime (CPU) on uint8 images."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"image": images[i:i + 1024]})[0]
                           for i in range(0, len(images), 1024)])


def write_classifier(model: MnistClassifier, folder: str | Path, *,
                     val_images: np.ndarray, val_labels: np.ndarray,
                     config: ClassifierConfig, data_sha256: str = "",
                     train_size: int = 0) -> dict[str, object]:
    """Export to ``folder/classifier.onnx`` and write ``folder/manifest.json``.

    The validation accuracy in the manifest is measured on the exported ONNX file, the
    artefact that is shipped, not on the torch model.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / ONNX_FILE
    export_onnx(model, onnx_path)
    val_acc = accuracy(onnx_logits(onnx_path, val_images), val_labels)
    manifest: dict[str, object] = {
        "schema": 1,
        "name": CLASSIFIER_NAME,
        "version": int(folder.name) if folder.name.isdigit() else 1,
        "family": "classifier",
        "image": {"channels": 1, "height": 28, "width": 28},
        "classes": 10,
        "files": {"classifier": {"path": ONNX_FILE,
                                 "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()}},
        "onnx": {"opset": OPSET, "input": "image", "output": "logits"},
        "quality": {"val_accuracy": round(val_acc, 4), "val_images": int(len(val_images))},
        "training": {"data_sha256": data_sha256, "train_images": int(train_size),
                     "config": asdict(config)},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build(images_path: str | Path, labels_path: str | Path, out: str | Path, *,
          config: ClassifierConfig = ClassifierConfig(), log: bool = True) -> dict[str, object]:
    """Train on the training split of an IDX set and ship the classifier into ``out``."""
    from latentserve.worker.runtime.images import read_idx

    images = read_idx(images_path)
    labels = read_idx_labels(labels_path)
    train_x, train_y, val_x, val_y = split(images, labels)
    digest = hashlib.sha256(Path(images_path).read_bytes()).hexdigest()
    model = train_classifier(train_x, train_y, config, log=log)
    return write_classifier(model, out, val_images=val_x, val_labels=val_y, config=config,
                            data_sha256=digest, train_size=len(train_x))
