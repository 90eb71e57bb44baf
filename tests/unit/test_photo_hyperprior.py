"""The photo hyperprior: the integer hyper-decoder (worker/codec/intnet.py, its export
in export/publish/hyper_int.py) and code kind 5's exact layout on any-size models:
exact arithmetic, the index rule, round trips at odd sizes, golden bytes, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentserve.errors import CodeError, CorruptCode, ModelIntegrityError
from latentserve.export.publish import tables
from latentserve.export.publish.hyper_int import (
    OUT_BITS,
    float_reference,
    index_thresholds,
    integer_hyper_decoder,
)
from latentserve.worker.codec import intnet
from latentserve.worker.codec.codes import HYPERPRIOR, LatentCodec, parse_header
from latentserve.worker.codec.hyperprior import HyperTables
from latentserve.worker.codec.intnet import IntLayer, IntNet, load_intnet, save_intnet
from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime
from latentserve.worker.runtime.manifest import HyperpriorSpec
from latentserve.worker.runtime.pipeline import Pipeline
from latentserve.worker.runtime.repository import ModelRepository

torch.set_num_threads(1)
MODEL = "tiny-photo-hyper"


def _h_s(k: int = 4, m: int = 6, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.ConvTranspose2d(k, k, 5, stride=2, padding=2, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(k, k, 5, stride=2, padding=2, output_padding=1), nn.ReLU(),
        nn.Conv2d(k, m, 3, padding=1))


# -- the integer network ------------------------------------------------------------------

def test_integer_layers_compute_exactly_what_torch_computes_on_integers() -> None:
    """Integer weights and inputs small enough that float64 torch is exact too: the
    conv and the stride-2 deconv give torch's integers, bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.integers(-20, 21, (2, 3, 5, 7))
    wt = rng.integers(-50, 51, (3, 4, 5, 5))           # torch's ConvTranspose2d (C, O, k, k)
    wc = rng.integers(-50, 51, (2, 4, 3, 3))
    b1, b2 = rng.integers(-99, 100, 4), rng.integers(-99, 100, 2)
    deconv = IntLayer("deconv", np.ascontiguousarray(wt.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]),
                      b1, np.zeros(4, np.int64), relu=True)
    conv = IntLayer("conv", wc, b2, np.zeros(2, np.int64), relu=False)
    got = IntNet([deconv, conv], input_bound=20)(x)
    t = F.relu(F.conv_transpose2d(torch.from_numpy(x).double(), torch.from_numpy(wt).double(),
                                  torch.from_numpy(b1).double(), stride=2, padding=2,
                                  output_padding=1))
    want = F.conv2d(t, torch.from_numpy(wc).double(), torch.from_numpy(b2).double(), padding=1)
    assert got.shape == (2, 2, 10, 14)
    assert np.array_equal(got, want.numpy().astype(np.int64))


def test_results_do_not_depend_on_how_the_products_are_split(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Bands of one row or of the whole grid: the same integers (the sums are exact)."""
    net, _ = integer_hyper_decoder(_h_s(), 12)
    z = np.random.default_rng(1).integers(-12, 13, (2, 4, 6, 9))
    whole = net(z)
    monkeypatch.setattr(intnet, "BAND_ELEMENTS", 1)
    assert np.array_equal(net(z), whole)


def test_quantised_hyper_decoder_tracks_the_float_one() -> None:
    net, thresholds = integer_hyper_decoder(_h_s(), 12)
    z = np.random.default_rng(2).integers(-6, 7, (3, 4, 5, 5))
    t = net(z)
    ref = float_reference(_h_s(), z)
    assert np.abs(t / 2**OUT_BITS - ref).max() < 0.02   # 1/256 steps, rounded weights
    scale = F.softplus(torch.from_numpy(ref)).numpy()
    float_index = np.clip(np.searchsorted(tables.hyper_scale_table(), scale, "left"), 0, 63)
    got = intnet.table_indices(t, thresholds)
    assert np.abs(got - float_index).max() <= 1 and (got == float_index).mean() > 0.97


def test_thresholds_are_compressai_s_rule() -> None:
    """index(t) = the smallest i with s_i >= softplus(t / 2^OUT_BITS), at 0 and 63 beyond."""
    thresholds = index_thresholds()
    scales = tables.hyper_scale_table()
    t = np.arange(-4000, 60000, 7)
    s = np.log1p(np.exp(t / 2**OUT_BITS))
    far = np.abs(np.log(s[:, None] / scales[None])).min(1) > 1e-9
    want = np.clip(np.searchsorted(scales, s, "left"), 0, 63)
    got = intnet.table_indices(t, thresholds)
    assert np.array_equal(got[far], want[far])
    assert got[0] == 0 and got[-1] == 63 and thresholds.tolist() == sorted(thresholds.tolist())


def test_a_network_that_could_lose_exactness_is_refused() -> None:
    w = np.full((4, 4, 5, 5), 1 << 20, np.int64)
    layer = IntLayer("conv", w, np.zeros(4, np.int64), np.zeros(4, np.int64), relu=False)
    with pytest.raises(ModelIntegrityError, match="past 2\\^53"):
        IntNet([layer, layer], input_bound=1 << 20)
    with pytest.raises(ValueError, match="beyond the network's bound"):
        IntNet([layer], input_bound=3)(np.full((1, 4, 2, 2), 4))


def test_the_file_round_trips_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    net, thresholds = integer_hyper_decoder(_h_s(), 12)
    path = tmp_path / "h.npz"
    path.write_bytes(save_intnet(net.layers, 12, thresholds))
    again, t2 = load_intnet(path)
    z = np.random.default_rng(3).integers(-12, 13, (1, 4, 3, 4))
    assert np.array_equal(again(z), net(z)) and np.array_equal(t2, thresholds)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelIntegrityError, match="not an integer hyper-decoder"):
        load_intnet(path)


# -- the exact layout -------------------------------------------------------------------------

def _spec(channels: int = 2) -> HyperpriorSpec:
    z_freqs = tuple(tuple(tables.quantize_pmf(np.array([1.0, 4.0, 8.0, 4.0, 1.0])))
                    for _ in range(channels))
    return HyperpriorSpec(
        z_shape=(channels, 0, 0), z_offsets=(-2,) * channels, z_freqs=z_freqs,
        scale_min=tables.HYPER_SCALE_MIN, scale_max=tables.HYPER_SCALE_MAX,
        levels=tables.HYPER_LEVELS, guard=tables.HYPER_GUARD, y_offset=-6,
        tables=tuple(tuple(t) for t in tables.gaussian_tables(-6, 6)), z_stride=4)


def test_golden_exact_payload() -> None:
    """The exact layout's bytes for fixed (z, y, indices): a changed byte means the format
    changed and photo codes in the wild would stop decoding."""
    t = HyperTables(_spec(), (3, 0, 0), exact=True)
    z = np.array([[[0, 1]], [[2, -2]]], np.int32)
    y = np.array([[[0, 1, -2, 0, 3]], [[0, 0, -1, 5, -6]], [[1, 1, 0, 0, 2]]], np.int32)
    indices = (np.arange(15).reshape(3, 1, 5) * 7) % 64
    payload = t.encode_exact(z, y, indices)
    assert payload.hex() == GOLDEN_EXACT
    coder, z2 = t.read_z(payload, (2, 1, 2))
    assert np.array_equal(z2, z) and np.array_equal(t.read_y(coder, indices), y)


GOLDEN_EXACT = "b13cb2432dd7b656d7"


@pytest.fixture(scope="module")
def codec(photo_repo: Path) -> LatentCodec:
    entry = ModelRepository(photo_repo).load(MODEL)
    return LatentCodec(ModelRuntime(entry, EngineConfig(intra_op_threads=1)))


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (64, 64), (321, 481), (100, 7)])
def test_symbols_round_trip_exactly_at_odd_sizes(codec: LatentCodec, size: tuple[int, int]
                                                 ) -> None:
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    images = rng.integers(0, 256, (2, 3, *size), dtype=np.uint8)
    symbols = codec.runtime.encode(images)
    # The served path: z from the float latent (z.input "latent"); from the symbols
    # when only they are at hand. Both decode to the symbols.
    assert codec.manifest.hyperprior.z_input == "latent"  # type: ignore[union-attr]
    for codes in (codec.compress_images(images, size=size), codec.encode(symbols, size=size)):
        headers = [parse_header(c) for c in codes]
        assert [(h.kind, h.size) for h in headers] == [(HYPERPRIOR, size)] * 2
        back = codec.decode_headers(headers)
        assert all(np.array_equal(b, s) for b, s in zip(back, symbols, strict=True))  # type: ignore[arg-type]
    bits = codec.cross_entropy_bits(symbols, [HYPERPRIOR] * 2, size=size)
    sizes = [8 * len(h.payload) for h in headers]
    assert all(abs(b - n) <= 16 + 0.01 * b for b, n in zip(bits, sizes, strict=True))  # 2 B + 1 %


def test_changed_or_cut_codes_are_refused(codec: LatentCodec, photo_repo: Path) -> None:
    image = np.random.default_rng(7).integers(0, 256, (1, 3, 40, 72), dtype=np.uint8)
    (code,) = codec.encode(codec.runtime.encode(image), size=(40, 72))
    for bad in (code[:-1], code[:-3], code[:-1] + bytes([code[-1] ^ 1]), code + b"\0"):
        (result,) = codec.decode_each([bad])
        assert isinstance(result, CodeError)
    pipe = Pipeline(photo_repo, EngineConfig(intra_op_threads=1))
    (ok, cut) = pipe.reconstruct_each([code, code[:-2]])
    assert isinstance(ok, np.ndarray) and ok.shape == (3, 40, 72)
    assert isinstance(cut, CorruptCode)


def test_manifests_that_cannot_serve_photos_exactly_are_refused(photo_repo: Path,
                                                                tmp_path: Path) -> None:
    src = photo_repo / MODEL / "1"
    for case, match, edit in (
            ("a float hyper-decoder", "any-size hyperprior needs .* integer hyper_decoder_int",
             lambda m: m["files"].update(hyper_decoder=m["files"].pop("hyper_decoder_int"))),
            ("no z stride", r"an any-size z: shape \(C, 0, 0\) and a stride",
             lambda m: m["code"]["hyperprior"]["z"].pop("stride"))):
        repo = tmp_path / case.replace(" ", "-")
        shutil.copytree(src, repo / MODEL / "1")
        path = repo / MODEL / "1" / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
        with pytest.raises(ModelIntegrityError, match=match):
            ModelRepository(repo).load(MODEL)
