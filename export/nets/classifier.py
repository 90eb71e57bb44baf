"""The MNIST classifier that scores generated samples (``latentserve eval --samples``).

A small CNN trained on the training split (every image but the last 1000 of the IDX
set), exported to ONNX beside a small manifest into
``models/classifiers/mnist-classifier/1/``. It lives outside ``models/<name>/<version>``
on purpose: the model repository lists every ``models/*/*/manifest.json`` as a servable
model, and a classifier is not one.

ONNX contract: input ``image`` uint8 (N, 1, 28, 28) -> outputs ``logits`` float32 (N, 10)
and ``features`` float32 (N, 64), the penultimate activations (fc1 after its ReLU) that
``latentserve eval`` fits its Frechet distance to; the x/255 scaling happens in the graph,
as for the encoders. ``add_features_output`` gives a classifier exported with logits only
the second output without touching its weights or its predictions.
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
# The second graph output: the penultimate activations, what the Frechet distance uses.
FEATURES_OUTPUT = "features"
FEATURE_DIM = 64
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

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The penultimate activations (N, 64): fc1 after its ReLU, before dropout."""
        x = (image.to(torch.float32) / 255.0 - _MEAN) / _STD
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc2(self.drop(self.features(image)))
        return logits


class _WithFeatures(nn.Module):
    """What is exported: (logits, features) from one pass."""

    def __init__(self, model: MnistClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.features(image)
        logits: torch.Tensor = self.model.fc2(feats)  # dropout is the identity in eval mode
        return logits, feats


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


def export_onnx(model: MnistClassifier, path: str | Path, *, features: bool = True) -> None:
    """Write the model as one self-contained ONNX file with a dynamic batch axis; outputs
    ``logits`` and (unless ``features=False``, the original export) ``features``."""
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
        torch.onnx.export(_WithFeatures(model).eval() if features else model, (example,), str(path),
                          input_names=["image"],
                          output_names=["logits", FEATURES_OUTPUT] if features else ["logits"],
                          opset_version=OPSET, dynamo=True,
                          external_data=False, dynamic_shapes={"image": {0: batch}},
                          verbose=False)


def add_features_output(path: str | Path) -> str:
    """Expose the tensor that feeds the final Gemm (the logits) as a second graph output,
    ``features`` (N, 64), rewriting ``path`` in place; returns the new file's sha256.

    Only a tensor name and a graph output are added: no node, weight or attribute
    changes, so the logits stay bit-identical (tests/unit/test_classifier.py checks
    this on the validation split). A file that already has the output is left as is.
    """
    import onnx
    from onnx import TensorProto, helper

    path = Path(path)
    model = onnx.load(str(path))
    graph = model.graph
    outputs = [o.name for o in graph.output]
    if FEATURES_OUTPUT not in outputs:
        if outputs != ["logits"]:
            raise ValueError(f"{path}: expected one graph output 'logits', found {outputs}")
        last = [n for n in graph.node if "logits" in n.output]
        if len(last) != 1 or last[0].op_type != "Gemm":
            raise ValueError(f"{path}: 'logits' is not made by one Gemm node")
        old = last[0].input[0]
        for node in graph.node:  # rename the penultimate tensor wherever it appears
            node.input[:] = [FEATURES_OUTPUT if i == old else i for i in node.input]
            node.output[:] = [FEATURES_OUTPUT if o == old else o for o in node.output]
        for info in graph.value_info:
            if info.name == old:
                info.name = FEATURES_OUTPUT
        graph.output.append(helper.make_tensor_value_info(
            FEATURES_OUTPUT, TensorProto.FLOAT, ["N", FEATURE_DIM]))
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def onnx_logits(path: str | Path, images: np.ndarray) -> np.ndarray:
    """Run the exported classifier with onnxruntime (CPU) on uint8 images."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["logits"], {"image": images[i:i + 1024]})[0]
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
        "onnx": {"opset": OPSET, "input": "image", "output": "logits",
                 "features": FEATURES_OUTPUT, "feature_dim": FEATURE_DIM},
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
