"""An integer network evaluated exactly: the same output on every machine.

A photo hyperprior's hyper-decoder (h_s) picks the Gaussian table of every latent
element, and a decoder must pick the same tables as the encoder or the code decodes to
garbage. A float network can round differently on another CPU (or GPU kernel), and a
photo has ~10^5 elements, so some scale always lands near a table boundary (kind 5's
guard rule works for 28x28 digits, not for photos). Following Balle, Johnston and
Minnen, "Integer networks for data compression with latent-variable models" (ICLR
2019), h_s is frozen at export into integer weights, biases and power-of-two
rescalings; every step is integer arithmetic, so there is nothing to round.

Each layer: acc = conv(x, W) (integers), then (acc + B) >> shift per output channel
(floor), then optionally ReLU capped at ACT_MAX. The convolutions run as float64 matrix
products (BLAS): products and sums of integers are exact in float64 while every partial
sum stays below 2^53, in any summation order and with or without FMA; ``IntNet``
refuses a network whose worst case could pass that bound. Layer kinds: ``conv`` (k x k,
stride 1, zero padding k // 2) and ``deconv`` (torch's ConvTranspose2d with stride 2,
padding (k - 1) // 2, output_padding 1: the output is twice the input's size).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from latentserve.errors import ModelIntegrityError

ACT_MAX = (1 << 20) - 1   # hidden activations are clipped to [0, ACT_MAX]
EXACT_BOUND = 1 << 53     # float64 represents every integer below this exactly
KINDS = ("conv", "deconv")
# Rows of output per matrix product: bounds the im2col copy (~rows * width * C * k^2 * 8 B).
BAND_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class IntLayer:
    """One layer. ``weight`` is in conv form (O, C, k, k) for both kinds (a deconv's
    torch weight (C, O, k, k) transposed and flipped at export); ``shift`` (O,) >= 0."""

    kind: str
    weight: np.ndarray
    bias: np.ndarray
    shift: np.ndarray
    relu: bool


class IntNet:
    """A checked stack of ``IntLayer``s; ``__call__`` maps int64 (N, C, h, w) to int64."""

    def __init__(self, layers: list[IntLayer], input_bound: int) -> None:
        """``input_bound``: the largest |input| the network will be given (refused above)."""
        if not layers:
            raise ModelIntegrityError("an integer network needs at least one layer")
        self.layers = layers
        self.input_bound = int(input_bound)
        bound = self.input_bound
        channels = layers[0].weight.shape[1]
        for i, layer in enumerate(layers):
            w = layer.weight
            if layer.kind not in KINDS or w.ndim != 4 or w.shape[2] != w.shape[3] \
                    or w.shape[2] % 2 != 1 or w.shape[1] != channels:
                raise ModelIntegrityError(f"integer layer {i}: kind {layer.kind!r}, weight "
                                          f"{w.shape} is not a conv/deconv with an odd square "
                                          f"kernel over {channels} channels")
            o = w.shape[0]
            if layer.bias.shape != (o,) or layer.shift.shape != (o,) \
                    or int(layer.shift.min()) < 0 or int(layer.shift.max()) > 62:
                raise ModelIntegrityError(f"integer layer {i}: bias and shift need one entry "
                                          "per output channel, shifts in 0..62")
            terms = w.shape[1] * w.shape[2] * w.shape[3]
            worst = terms * int(np.abs(w).max(initial=0)) * bound + int(np.abs(layer.bias).max())
            if worst >= EXACT_BOUND:
                raise ModelIntegrityError(f"integer layer {i} could reach {worst:.3g}, past "
                                          "2^53, where float64 sums stop being exact")
            bound = ACT_MAX if layer.relu else worst
            channels = o
        self.out_channels = channels

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind not in "iu" or x.ndim != 4:
            raise ValueError(f"an integer network takes integer (N, C, h, w), got {x.dtype} "
                             f"{x.shape}")
        if x.size and int(np.abs(x.astype(np.int64)).max()) > self.input_bound:
            raise ValueError(f"input beyond the network's bound {self.input_bound}")
        out = x.astype(np.int64)
        for layer in self.layers:
            out = _layer(out, layer)
        return out


def _layer(x: np.ndarray, layer: IntLayer) -> np.ndarray:
    weight = layer.weight.astype(np.float64)
    acc = _conv(x, weight) if layer.kind == "conv" else _deconv(x, weight)
    out: np.ndarray = acc.astype(np.int64) + layer.bias.reshape(1, -1, 1, 1)
    out >>= layer.shift.astype(np.int64).reshape(1, -1, 1, 1)  # floor division by 2^shift
    if layer.relu:
        np.clip(out, 0, ACT_MAX, out=out)
    return out


def _conv(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    p = weight.shape[2] // 2
    padded = np.zeros((n, c, h + 2 * p, w + 2 * p), np.float64)
    padded[:, :, p:p + h, p:p + w] = x
    return _valid_conv(padded, weight)


def _deconv(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """ConvTranspose2d(stride 2, padding (k-1)/2, output_padding 1), ``weight`` in conv
    form over the zero-inserted input, computed per output phase: output (2r + py,
    2s + px) sees only the taps a = ay, ay + 2, ... of the kernel, on input rows r + dy + t
    (the zero-inserted rows add nothing), a quarter of the products."""
    n, c, h, w = x.shape
    k = weight.shape[2]
    lo = k - 1 - (k - 1) // 2  # the zero-inserted input's top/left padding
    pad = k
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), np.float64)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    out = np.empty((n, weight.shape[0], 2 * h, 2 * w), np.float64)
    for py in (0, 1):
        ay = (lo - py) % 2
        ty, dy = len(range(ay, k, 2)), (py + ay - lo) // 2
        for px in (0, 1):
            ax = (lo - px) % 2
            tx, dx = len(range(ax, k, 2)), (px + ax - lo) // 2
            region = padded[:, :, pad + dy:pad + dy + h + ty - 1, pad + dx:pad + dx + w + tx - 1]
            out[:, :, py::2, px::2] = _valid_conv(region, weight[:, :, ay::2, ax::2])
    return out


def _valid_conv(padded: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float64 of integers, weight (O, C, kh, kw) -> (N, O, H-kh+1, W-kw+1),
    exact (see the module docstring), in bands of output rows."""
    o, c, kh, kw = weight.shape
    n, _, hp, wp = padded.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    out = np.empty((n, o, ho, wo), np.float64)
    flat_w = np.ascontiguousarray(weight).reshape(o, c * kh * kw)
    rows = max(1, BAND_ELEMENTS // max(1, wo * c * kh * kw))
    for i in range(n):
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            band = sliding_window_view(padded[i, :, r0:r1 + kh - 1], (kh, kw), axis=(1, 2))
            # (C, rb, wo, kh, kw) -> (rb * wo, C * kh * kw): one BLAS product per band
            cols = band.transpose(1, 2, 0, 3, 4).reshape((r1 - r0) * wo, c * kh * kw)
            out[i, :, r0:r1] = (cols @ flat_w.T).T.reshape(o, r1 - r0, wo)
    return out


# -- the file format (an .npz of plain integer arrays; no pickles) --------------------

def save_intnet(layers: list[IntLayer], input_bound: int, thresholds: np.ndarray) -> bytes:
    """The bytes of a hyper-decoder file: the layers and the index thresholds."""
    arrays: dict[str, np.ndarray] = {
        "kinds": np.array([KINDS.index(layer.kind) for layer in layers], np.int8),
        "relu": np.array([layer.relu for layer in layers], np.int8),
        "input_bound": np.array(int(input_bound), np.int64),
        "thresholds": np.asarray(thresholds, np.int64)}
    for i, layer in enumerate(layers):
        w = np.asarray(layer.weight)
        small = w.size == 0 or int(np.abs(w).max()) < 1 << 15
        arrays[f"w{i}"] = w.astype(np.int16 if small else np.int32)
        arrays[f"b{i}"] = np.asarray(layer.bias, np.int64)
        arrays[f"s{i}"] = np.asarray(layer.shift, np.int8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def load_intnet(path: str | Path) -> tuple[IntNet, np.ndarray]:
    """(the network, its int64 index thresholds) from a hyper-decoder file; a malformed
    file is a ModelIntegrityError naming what is wrong."""
    try:
        # From bytes: np.load leaves its file open when a broken archive raises.
        with np.load(io.BytesIO(Path(path).read_bytes()), allow_pickle=False) as f:
            kinds = [KINDS[int(k)] for k in f["kinds"]]
            relu = [bool(r) for r in f["relu"]]
            layers = [IntLayer(kind, f[f"w{i}"].astype(np.int64), f[f"b{i}"].astype(np.int64),
                               f[f"s{i}"].astype(np.int64), relu[i])
                      for i, kind in enumerate(kinds)]
            bound = int(f["input_bound"])
            thresholds = f["thresholds"].astype(np.int64)
    except (OSError, KeyError, ValueError, IndexError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelIntegrityError(f"{Path(path).name} is not an integer hyper-decoder "
                                  f"({type(exc).__name__}: {exc})") from None
    if thresholds.ndim != 1 or np.any(np.diff(thresholds) < 0):
        raise ModelIntegrityError(f"{Path(path).name}: the index thresholds must be a "
                                  "non-decreasing list")
    return IntNet(layers, bound), thresholds


def table_indices(t: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The last layer's integers -> table indices: how many thresholds lie below each."""
    out: np.ndarray = np.searchsorted(thresholds, t, side="left")
    return out
