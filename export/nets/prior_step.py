"""The PixelCNN prior evaluated one grid position at a time (``prior_step.onnx``).

A full prior pass costs the same at every position, so decoding (or sampling) an h x w
grid with it costs h*w passes. ``PriorStep`` computes the logits at ONE position p from
per-layer caches of the residual stream at the positions before p::

    indices (N, h, w), p  -> gather the first layer's causal taps (positions < p only)
      -> embed -> matmul (masked "A" weights, causal taps only) -> x0[p]
      -> per block l: gather x_l at p's causal 3x3 neighbours from cache l (all < p),
         append x_l[p] -> ReLU -> matmul ("B") -> ReLU -> 1x1 -> x_{l+1}[p]
      -> ReLU -> 1x1 -> logits (N, K) at p;  outputs x_0[p] .. x_{L-1}[p] for the caches

Caches are float32 (N, h*w + 1, C): row q < h*w holds x_l at position q (the caller
writes the returned ``feat<l>`` into row p); the last row stays zero. A tap outside the
grid reads that zero row (and the embedding of a pseudo-code K, a zero row too), so no
select is needed; only taps before p (plus x_l[p] itself) are read, so what the indices
or the caches hold at positions >= p cannot reach the result: a teacher-forced encoder and
a decoder feed bit-identical inputs at every step.
Outputting the features at p instead of whole updated caches keeps a step's memory
traffic at O(N*C) rather than O(N*C*h*w) (the caller updates its caches in place).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentserve.errors import ModelIntegrityError
from latentserve.export.nets.prior import MaskedConv2d, PixelCNNPrior


def _taps(conv: MaskedConv2d) -> list[tuple[int, int]]:
    """(dy, dx) of a masked conv's used taps, raster order; (0, 0) is the output's own cell."""
    mask = conv.mask[0, 0]
    rows, kw = mask.shape
    return [(r - (rows - 1), c - kw // 2) for r in range(rows) for c in range(kw) if mask[r, c] > 0]


def _tap_matrix(conv: MaskedConv2d, taps: list[tuple[int, int]]) -> Tensor:
    """The conv's weights on ``taps`` as a (T * in, out) matrix (tap-major rows)."""
    rows, kw = conv.mask.shape[-2:]
    r = [dy + rows - 1 for dy, _ in taps]
    c = [dx + kw // 2 for _, dx in taps]
    w = conv.weight.detach()[:, :, r, c]  # (out, in, T)
    return w.permute(2, 1, 0).reshape(len(taps) * w.shape[1], w.shape[0]).contiguous()


class PriorStep(nn.Module):
    """Logits at one position from caches of earlier positions; see the module docstring.

    forward(indices (N, h, w) int64, position () int64, *caches (N, h*w + 1, C) float32)
      -> (logits (N, K), feat_0 (N, C), ..., feat_{L-1} (N, C))
    """

    # Buffers (register_buffer); the per-layer ones (b<i>_w, m<i>_b, <name>_dy...) are
    # read by name with getattr.
    embed: Tensor
    first_w: Tensor
    first_b: Tensor
    out_w: Tensor
    out_b: Tensor

    def __init__(self, prior: PixelCNNPrior) -> None:
        super().__init__()
        h, w = prior.config.grid
        self.grid = (h, w)
        self.num_layers = len(prior.blocks)
        emb = prior.embed.weight.detach()
        # Row K: the embedding of "outside the grid", exactly zero.
        self.register_buffer("embed", torch.cat([emb, torch.zeros_like(emb[:1])]))
        first = _taps(prior.first)
        assert (0, 0) not in first, "the first layer must be a type-A mask"
        self._register_taps("first", first)
        self.register_buffer("first_w", _tap_matrix(prior.first, first))
        self.register_buffer("first_b", prior.first.bias.detach().clone())
        for i, (conv, mix) in enumerate(prior.layers()):
            taps = _taps(conv)
            if taps[-1] != (0, 0) or (0, 0) in taps[:-1]:
                raise ValueError(f"block {i}: expected a type-B mask (own cell last), got {taps}")
            self._register_taps(f"b{i}", taps[:-1])
            self.register_buffer(f"b{i}_w", _tap_matrix(conv, taps))
            self.register_buffer(f"b{i}_b", conv.bias.detach().clone())
            self.register_buffer(f"m{i}_w", mix.weight.detach()[:, :, 0, 0].t().contiguous())
            assert mix.bias is not None  # nn.Conv2d's default bias=True
            self.register_buffer(f"m{i}_b", mix.bias.detach().clone())
        self.register_buffer("out_w", prior.out.weight.detach()[:, :, 0, 0].t().contiguous())
        assert prior.out.bias is not None  # nn.Conv2d's default bias=True
        self.register_buffer("out_b", prior.out.bias.detach().clone())

    def _register_taps(self, name: str, taps: list[tuple[int, int]]) -> None:
        self.register_buffer(f"{name}_dy", torch.tensor([t[0] for t in taps], dtype=torch.long))
        self.register_buffer(f"{name}_dx", torch.tensor([t[1] for t in taps], dtype=torch.long))

    def _where(self, name: str, position: Tensor) -> Tensor:
        """Flat rows of the taps around ``position``; taps outside the grid get row h*w."""
        h, w = self.grid
        y = torch.div(position, w, rounding_mode="floor")
        x = position - y * w
        ny = y + getattr(self, f"{name}_dy")
        nx = x + getattr(self, f"{name}_dx")
        valid = ((ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)).to(torch.long)
        inside = ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)
        rows: Tensor = inside * valid + (h * w) * (1 - valid)
        return rows

    def forward(self, indices: Tensor, position: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        n = indices.shape[0]
        outside = torch.full_like(indices[:, :1, 0], self.embed.shape[0] - 1)  # (N, 1): code K
        flat = torch.cat([indices.reshape(n, -1), outside], dim=1)
        codes = torch.index_select(flat, 1, self._where("first", position))  # (N, T)
        x = F.embedding(codes, self.embed).flatten(1) @ self.first_w + self.first_b  # (N, C)
        feats = [x]
        for i in range(self.num_layers):
            nb = torch.index_select(caches[i], 1, self._where(f"b{i}", position))  # (N, T, C)
            patch = F.relu(torch.cat([nb, x[:, None]], dim=1)).flatten(1)
            hid = F.relu(patch @ getattr(self, f"b{i}_w") + getattr(self, f"b{i}_b"))
            x = x + hid @ getattr(self, f"m{i}_w") + getattr(self, f"m{i}_b")
            if i + 1 < self.num_layers:
                feats.append(x)
        logits = F.relu(x) @ self.out_w + self.out_b
        return (logits, *feats)

    def cache_shapes(self, n: int) -> list[tuple[int, int, int]]:
        """Shapes of the caches for a batch of ``n`` grids."""
        h, w = self.grid
        return [(n, h * w + 1, int(self.first_b.shape[0]))] * self.num_layers


@torch.no_grad()
def step_all(step: PriorStep, indices: Tensor) -> Tensor:
    """Teacher-forced logits (N, K, h, w) by stepping through every position (tests, parity)."""
    n = indices.shape[0]
    h, w = step.grid
    caches = [torch.zeros(s) for s in step.cache_shapes(n)]
    out = []
    for p in range(h * w):
        logits, *feats = step(indices, torch.tensor(p, dtype=torch.long), *caches)
        for cache, f in zip(caches, feats, strict=True):
            cache[:, p] = f
        out.append(logits)
    return torch.stack(out, dim=2).reshape(n, -1, h, w)


def export_prior_step(prior: PixelCNNPrior, example: Tensor, path: Path, *,
                      opset: int = 17, tolerance: float = 1e-4) -> None:
    """Write ``prior_step.onnx`` and check it against the full prior on ``example`` indices.

    I/O names: ``indices``, ``position``, ``cache0``.. -> ``logits``, ``feat0``..;
    the batch axis N is dynamic. Raises ModelIntegrityError when onnxruntime's stepped logits differ
    from the torch prior's full pass by more than ``tolerance``.
    """
    import onnx
    import onnxruntime as ort

    prior.eval()
    step = PriorStep(prior).eval()
    example = example.to(torch.long)
    caches = [torch.zeros(s) for s in step.cache_shapes(len(example))]
    cache_names = [f"cache{i}" for i in range(len(caches))]
    feat_names = [f"feat{i}" for i in range(len(caches))]
    axes = {name: {0: "N"} for name in ["indices", *cache_names, "logits", *feat_names]}
    with warnings.catch_warnings():
        # Same choice as exporter.onnx_export: the TorchScript exporter, pinned torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(step, (example, torch.tensor(0, dtype=torch.long), *caches), str(path),
                          input_names=["indices", "position", *cache_names],
                          output_names=["logits", *feat_names], opset_version=opset,
                          dynamo=False, dynamic_axes=axes)
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = prior(example).numpy()
    got = run_steps(sess, example.numpy())
    diff = float(np.abs(got - want).max())
    if not diff <= tolerance:
        raise ModelIntegrityError(f"prior_step.onnx differs from the prior by {diff:.3g} "
                         f"(limit {tolerance})")


def run_steps(sess: object, indices: np.ndarray) -> np.ndarray:
    """Teacher-forced logits (N, K, h, w) from an onnxruntime session of the step graph."""
    inputs = sess.get_inputs()  # type: ignore[attr-defined]
    n, h, w = indices.shape
    caches = [np.zeros((n, h * w + 1, int(i.shape[2])), np.float32) for i in inputs[2:]]
    out = []
    for p in range(h * w):
        feed = {"indices": indices.astype(np.int64), "position": np.array(p, np.int64)}
        feed.update({f"cache{i}": c for i, c in enumerate(caches)})
        logits, *feats = sess.run(None, feed)  # type: ignore[attr-defined]
        for c, f in zip(caches, feats, strict=True):
            c[:, p] = f
        out.append(logits)
    return np.stack(out, axis=2).reshape(n, -1, h, w)
