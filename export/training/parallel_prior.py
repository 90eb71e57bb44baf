"""Training the parallel VQ prior on a shipped VQ-VAE's index grids.

The grids come from the model's own ``encoder.onnx`` through onnxruntime (the codes the
served model writes), for the training images and their 1-px shifts. Each training
example is one grid and one group g (drawn with probability proportional to its size):
the loss is the cross-entropy of group g's indices with the positions of groups >= g
masked (``ParallelPrior.loss``), so its mean is the cost per index the code pays.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latentserve.export.nets.parallel_prior import ParallelPrior, ParallelPriorConfig
from latentserve.export.training.data import Dataset
from latentserve.export.training.train import _batches, _run_steps, seed_everything, shifted

CHECKPOINT_KIND = "parallel_prior"


def onnx_codes(model_dir: str | Path, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """uint8 images (N, 1, H, W) -> int64 index grids (N, h, w) from ``model_dir``'s
    encoder.onnx (one onnxruntime thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(Path(model_dir) / "encoder.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    out = [sess.run(None, {"image": np.ascontiguousarray(images[i:i + batch])})[0]
           for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.int64)


def train_parallel_prior(codes: np.ndarray, config: ParallelPriorConfig, *, steps: int,
                         lr: float = 2e-3, batch_size: int = 128, seed: int = 1,
                         progress: bool = True) -> tuple[ParallelPrior, list[dict[str, float]]]:
    """Fit a ParallelPrior to index grids (N, h, w); returns it in eval mode and the history."""
    gen = seed_everything(seed)
    prior = ParallelPrior(config)
    prior.train()
    grids = torch.as_tensor(codes, dtype=torch.long)
    n = len(grids)

    # A group drawn with probability size / h*w (the group of a uniform position): the
    # loss is then the cost per index that the code pays.
    rank = prior.rank

    def step(idx: Tensor) -> dict[str, Tensor]:
        group = rank[torch.randint(0, len(rank), (len(idx),), generator=gen)]
        loss = prior.loss(grids[idx], group)
        return {"loss": loss, "bits_per_index": loss.detach() / math.log(2)}

    bs = min(batch_size, n)
    history = _run_steps(list(prior.parameters()), steps, lr, step,
                         _batches(n, bs, steps, gen), progress, "parallel prior")
    prior.eval()
    return prior, history


@torch.no_grad()
def bits_per_index(prior: ParallelPrior, codes: np.ndarray) -> float:
    """The float softmax cost of grids (N, h, w) under the prior, bits per index."""
    grids = torch.as_tensor(codes, dtype=torch.long)
    logp = torch.log_softmax(prior.all_logits(grids), dim=-1)
    picked = logp.gather(2, grids.reshape(len(grids), -1, 1))
    return float(-picked.mean() / math.log(2))


def train_from_model(model_dir: str | Path, data: Dataset, config: ParallelPriorConfig, *,
                     steps: int, shifts: int = 1, lr: float = 2e-3, batch_size: int = 128,
                     seed: int = 1, progress: bool = True) -> dict[str, Any]:
    """Codes of ``data.train`` (and shifts) from the model's encoder, a trained prior:
    the checkpoint dict (config, weights, history, validation bits, provenance)."""
    t0 = time.time()
    codes = onnx_codes(model_dir, shifted(data.train, shifts))
    prior, history = train_parallel_prior(codes, config, steps=steps, lr=lr,
                                          batch_size=batch_size, seed=seed, progress=progress)
    val_bits = bits_per_index(prior, onnx_codes(model_dir, data.val))
    return {
        "kind": CHECKPOINT_KIND,
        "config": config.to_dict(),
        "state_dict": prior.state_dict(),
        "history": history,
        "base_model": str(model_dir),
        "train": {"steps": steps, "shifts": shifts, "lr": lr, "batch_size": batch_size,
                  "seed": seed, "seconds": round(time.time() - t0, 1),
                  "threads": torch.get_num_threads(), "device": "cpu",
                  "data_sha256": data.sha256, "num_train": len(data.train),
                  "num_grids": len(codes)},
        "val_bits_per_index_float": val_bits,
    }


def load_parallel_prior(ckpt: dict[str, Any]) -> ParallelPrior:
    """The prior of a checkpoint written by ``train_from_model``, in eval mode."""
    if ckpt.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"not a parallel prior checkpoint (kind {ckpt.get('kind')!r})")
    prior = ParallelPrior(ParallelPriorConfig.from_dict(ckpt["config"]))
    prior.load_state_dict(ckpt["state_dict"])
    prior.eval()
    return prior
