"""Code kind 5 (hyperprior): round trips, golden codes, refusals, the scale-index guard,
and a user's hyperprior through the export API (docs/code-format.md, docs/your-own-model.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from hyperprior_models import Decoder, Encoder, HyperDecoder, HyperEncoder, built_repo, digits
from latentserve.errors import (
    CodeError,
    CorruptCode,
    InvalidInput,
    ModelIntegrityError,
    NotExactlyDecodable,
)
from latentserve.export.publish import tables
from latentserve.export.publish.custom import Factorized, Hyperprior, export_model
from latentserve.worker.codec.codes import FACTORIZED, HYPERPRIOR, LatentCodec, parse_header
from latentserve.worker.codec.hyperprior import HyperTables, plan_offsets, scale_indices
from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime
from latentserve.worker.runtime.manifest import HyperpriorSpec, parse_manifest
from latentserve.worker.runtime.pipeline import Pipeline

torch.set_num_threads(1)
ONE_THREAD = EngineConfig(intra_op_threads=1)


def spec_of(z_shape: tuple[int, int, int] = (2, 2, 2), lo: int = -6, hi: int = 6,
            guard: float = tables.HYPER_GUARD) -> HyperpriorSpec:
    z_freqs = tuple(tuple(tables.quantize_pmf(np.array([1.0, 4.0, 8.0, 4.0, 1.0])))
                    for _ in range(z_shape[0]))
    return HyperpriorSpec(
        z_shape=z_shape, z_offsets=(-2,) * z_shape[0], z_freqs=z_freqs,
        scale_min=tables.HYPER_SCALE_MIN, scale_max=tables.HYPER_SCALE_MAX,
        levels=tables.HYPER_LEVELS, guard=guard, y_offset=lo,
        tables=tuple(tuple(t) for t in tables.gaussian_tables(lo, hi)))


def boundary_scale(spec: HyperpriorSpec, k: int, j: int) -> float:
    """The scale whose u - j/16 is (up to float rounding) the integer k: an index boundary."""
    lo, hi = np.log(spec.scale_min), np.log(spec.scale_max)
    return float(np.exp(lo + (k + j / 16) * (hi - lo) / (spec.levels - 1)))


# -- the index rule and its guard (no networks) -------------------------------------------

def test_gaussian_tables_are_computed_without_libm() -> None:
    """Decimal arithmetic: the same integers on every machine (a digest of all 64 tables
    over -30..30), and within a frequency of libm's erfc where that one is accurate."""
    import hashlib
    import math

    got = tables.gaussian_tables(-30, 30)
    digest = hashlib.sha256(np.array(got, "<i8").tobytes()).hexdigest()
    assert digest == GOLDEN_TABLES
    v = np.arange(-30, 31.0)
    for i, s in enumerate(tables.hyper_scale_table()):
        cdf = [0.5 * math.erfc(-(t / s) / math.sqrt(2)) for t in v[:-1] + 0.5]
        pmf = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
        assert np.abs(np.array(tables.quantize_pmf(pmf + 1e-12)) - got[i]).max() <= 1


GOLDEN_TABLES = "c25199e772bba9e3829a5659d2da324a106104e29481da355aab63782edeb578"


def test_index_rule_is_compressai_scale_table_at_offset_0() -> None:
    spec = spec_of()
    table = tables.hyper_scale_table()
    # between two table scales: the larger one (the smallest table scale >= s)
    mid = np.sqrt(table[:-1] * table[1:])
    idx, _ = scale_indices(mid[None], spec, 0)
    assert idx[0].tolist() == list(range(1, 64))
    idx, _ = scale_indices(np.array([[0.01, 0.05, 1000.0, 1e9]]), spec, 0)
    assert idx[0].tolist() == [0, 0, 63, 63]
    assert tables.gaussian_tables(-3, 3)[0][3] > 60000  # s = 0.11: nearly all mass at 0


def test_table_derivation_is_bit_identical_under_small_noise_or_refused() -> None:
    spec = spec_of()
    rng = np.random.default_rng(3)
    scales = np.exp(rng.uniform(np.log(0.05), np.log(300), (200, 4, 7, 7)))
    offsets, indices = plan_offsets(scales, spec)
    assert (offsets >= 0).all()  # 16 offsets: every image finds one
    assert (offsets > 0).any()  # and one offset alone does not always do
    for amp in (1e-6, 5e-6, 0.9 * spec.guard / 2):  # relative noise below the guard
        noisy = scales * np.exp(rng.uniform(-amp, amp, scales.shape))
        idx, margin = scale_indices(noisy, spec, offsets)
        assert np.array_equal(idx, indices)
        assert (margin >= spec.guard / 4).all()  # the decoder accepts them
    noisy = scales * np.exp(rng.uniform(-1e-2, 1e-2, scales.shape))  # far beyond the guard
    idx, margin = scale_indices(noisy, spec, offsets)
    changed = (idx != indices).reshape(len(idx), -1).any(1)
    # tables changed: noise this large can pass the margin test unseen (it moves a scale
    # across a boundary and beyond), which is why the payload carries check bytes (the
    # codec-level test below: such codes are refused, never decoded to another latent)
    assert changed.any() and (margin[changed] >= spec.guard / 4).any()


def test_a_scale_exactly_on_a_boundary_moves_the_offset_or_falls_back() -> None:
    spec = spec_of()
    on = np.full((1, 4), 1.0)
    on[0, 0] = boundary_scale(spec, 20, 0)
    idx, margin = scale_indices(on, spec, 0)
    assert margin[0] < 1e-12
    offsets, _ = plan_offsets(on, spec)
    assert offsets.tolist() == [1]  # offset 0 is refused, the next one qualifies
    every = np.array([[boundary_scale(spec, 20 + j, j) for j in range(16)]])
    offsets, _ = plan_offsets(every, spec)
    assert offsets.tolist() == [-1]  # one element on a boundary of each offset: fall back
    bad = np.array([[1.0, np.nan, 2.0], [1.0, 0.0, 2.0], [1.0, -1.0, np.inf]])
    assert plan_offsets(bad, spec)[0].tolist() == [-1, -1, -1]


def test_golden_payload() -> None:
    """The kind-5 payload bytes for fixed (j, z, y, indices): a changed byte means the
    format changed and codes in the wild would stop decoding."""
    spec = spec_of()
    t = HyperTables(spec, (3, 2, 2))
    z = np.array([[[0, 1], [-1, 0]], [[2, 0], [0, -2]]], np.int32)
    y = np.array([[[0, 1], [-2, 0]], [[3, 0], [0, -1]], [[0, 0], [5, -6]]], np.int32)
    indices = np.arange(12).reshape(3, 2, 2) * 5
    payload = t.encode(3, z, y, indices)
    assert payload.hex() == GOLDEN_PAYLOAD
    coder, j, z2 = t.read_head(payload)
    y2, _ = t.read_rest(coder, indices)
    assert j == 3 and np.array_equal(z2, z) and np.array_equal(y2, y)


GOLDEN_PAYLOAD = "e9eb79da864dd1a88593233c"


def test_manifest_validation_names_what_is_wrong(tmp_path: Path) -> None:
    repo = built_repo(tmp_path)
    text = (repo / "hp" / "1" / "manifest.json").read_text()
    import json

    raw = json.loads(text)
    del raw["files"]["hyper_decoder"]
    with pytest.raises(ModelIntegrityError, match="hyper_decoder"):
        parse_manifest(json.dumps(raw).encode())
    raw = json.loads(text)
    del raw["code"]["hyperprior"]["tables"]
    with pytest.raises(ModelIntegrityError, match="code.hyperprior is malformed"):
        parse_manifest(json.dumps(raw).encode())
    raw = json.loads(text)
    raw["code"]["hyperprior"]["y_offset"] += 1
    with pytest.raises(ModelIntegrityError, match="not inside the hyperprior tables"):
        parse_manifest(json.dumps(raw).encode())
    raw = json.loads(text)
    raw["code"]["hyperprior"]["guard"] = 0.5
    m = parse_manifest(json.dumps(raw).encode())
    assert m.hyperprior is not None
    with pytest.raises(ModelIntegrityError, match="guard"):
        HyperTables(m.hyperprior, m.latent_shape)


# -- a user's hyperprior, trained a few steps, exported through the API ------------------------

@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_repo(tmp_path_factory.mktemp("hp"))


def test_user_hyperprior_round_trips_through_the_pipeline(repo: Path) -> None:
    pipe = Pipeline(repo, ONE_THREAD)
    x = digits(40, seed=5)
    codes = pipe.compress("hp", x)
    kinds = [parse_header(c).kind for c in codes]
    assert set(kinds) <= {HYPERPRIOR, FACTORIZED} and kinds.count(HYPERPRIOR) >= 38
    codec = pipe.codec("hp")
    symbols = codec.runtime.encode(x)
    assert np.array_equal(codec.decode(codes), symbols)
    assert np.array_equal(pipe.reconstruct(codes), codec.runtime.decode(symbols))
    # the codes of one image do not depend on its batch
    assert [pipe.compress("hp", x[i:i + 1])[0] for i in range(5)] == codes[:5]
    # kind 1 on request, and the estimate of the tables' own cost is close to the bytes
    fac = pipe.compress("hp", x, kind="factorized")
    assert {parse_header(c).kind for c in fac} == {FACTORIZED}
    assert np.array_equal(pipe.reconstruct(fac), pipe.reconstruct(codes))
    bits = codec.cross_entropy_bits(symbols, kinds)
    payload = np.array([len(parse_header(c).payload) for c in codes])
    assert abs(float(np.mean(payload * 8 - bits))) < 8 and np.all(payload * 8 >= bits - 8)
    m = codec.manifest
    assert m.code_kind == "hyperprior" and m.raw["source"]["hyper_decoder"] == "HyperDecoder"
    assert "hyper_encoder" in m.files and m.quality["val_code_bytes_per_image"] > 0


def test_corrupted_codes_are_refused(repo: Path) -> None:
    pipe = Pipeline(repo, ONE_THREAD)
    codes = [c for c in pipe.compress("hp", digits(8, seed=9))
             if parse_header(c).kind == HYPERPRIOR]
    rng = np.random.default_rng(0)
    bad: list[bytes] = []
    for c in codes:
        for _ in range(20):
            b = bytearray(c)
            b[rng.integers(0, len(b))] ^= 1 << int(rng.integers(0, 8))
            bad.append(bytes(b))
        bad += [c[:-1], c + b"\0", c + b"\x01", c[:7]]
    results = pipe.reconstruct_each(bad)
    assert all(isinstance(r, CodeError) for r in results)
    # With the checksum recomputed (docs/code-format.md, "What a decoder accepts"): a
    # zero-ended payload is refused; bytes appended give the same latent or are refused
    # by the check, never another latent.
    from latentserve.worker.codec.codes import pack

    h = parse_header(codes[0])
    digest = pipe.codec("hp").manifest.digest
    zero_ended = pack(digest, HYPERPRIOR, h.payload + b"\0")
    assert isinstance(pipe.reconstruct_each([zero_ended])[0], CorruptCode)
    want = pipe.codec("hp").decode([codes[0]])
    result = pipe.codec("hp").decode_each([pack(digest, HYPERPRIOR, h.payload + b"\x07")])[0]
    assert isinstance(result, CodeError) or np.array_equal(result, want[0])


class NoisyHyper:
    """A real runtime whose hyper-decoder scales get relative noise exp(U(-amp, amp))."""

    def __init__(self, runtime: ModelRuntime, amp: float, seed: int = 0) -> None:
        self._rt, self.amp = runtime, amp
        self.rng = np.random.default_rng(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rt, name)

    def hyper_scales(self, z: np.ndarray) -> np.ndarray:
        s = self._rt.hyper_scales(z).astype(np.float64)
        return s * np.exp(self.rng.uniform(-self.amp, self.amp, s.shape))


def test_decoder_noise_below_the_guard_decodes_exactly_above_it_is_refused(repo: Path) -> None:
    pipe = Pipeline(repo, ONE_THREAD)
    x = digits(30, seed=11)
    codes = pipe.compress("hp", x)
    runtime = pipe.runtime("hp")
    want = runtime.encode(x)
    small = LatentCodec(NoisyHyper(runtime, 0.4 * tables.HYPER_GUARD))  # type: ignore[arg-type]
    assert np.array_equal(small.decode(codes), want)
    for amp, seed in ((3e-2, 1), (3e-1, 2)):
        noisy = LatentCodec(NoisyHyper(runtime, amp, seed))  # type: ignore[arg-type]
        results = noisy.decode_each(codes)
        refused = 0
        for r, w, c in zip(results, want, codes, strict=True):
            if isinstance(r, np.ndarray):  # never a wrong latent
                assert np.array_equal(r, w)
            else:
                assert isinstance(r, NotExactlyDecodable | CorruptCode), r
                refused += parse_header(c).kind == HYPERPRIOR
        assert refused > 0


def test_golden_codes_of_a_dyadic_model(tmp_path: Path) -> None:
    """A model whose encoder and hyper graphs compute exactly (dyadic weights, integer
    inputs): its tables and its codes for fixed symbols are the same bytes everywhere."""
    torch.manual_seed(0)
    x = digits(16, seed=1)
    enc, dec = DyadicEncoder(), Decoder()
    h_a, h_s = DyadicHyperEncoder(), DyadicHyperDecoder()
    export_model(family="ae", encoder=enc, decoder=dec, images=x,
                 latent_model=Hyperprior(h_a, h_s), repo=tmp_path, name="gold", version=1,
                 encoder_input="uint8")
    codec = Pipeline(tmp_path, ONE_THREAD).codec("gold")
    spec = codec.manifest.factorized
    assert spec is not None
    rng = np.random.default_rng(0)
    lo = np.array(spec.offsets).reshape(1, -1, 1, 1)
    top = lo + np.array([len(f) for f in spec.freqs]).reshape(1, -1, 1, 1) - 1
    symbols = np.clip(rng.integers(-3, 4, (3, *codec.manifest.latent_shape)), lo, top)
    payloads = codec.encode_payloads(symbols)
    assert [k for k, _ in payloads] == [HYPERPRIOR] * 3
    assert [p.hex() for _, p in payloads] == GOLDEN_DYADIC
    codes = codec.encode(symbols)
    assert np.array_equal(codec.decode(codes), symbols)


GOLDEN_DYADIC = [
    "000001345cd8edbbf6567f04db4b4d3a9b9b0e7777aa6ac1394ee4a023b1d9f3eebe18",
    "0000014b9cc4ab9a0f141f579ad538e3cb7883d172a752bd1b8c786bd18d8c6424fd3a",
    "00000150877c771c49a28fd53acc02350b639fe80531d53ee2d584f30bfa0457df98bb",
]


class DyadicEncoder(nn.Module):
    """uint8 pixels -> 4 x 4 cell means / 16 - 8 (and its negation, half, a constant)."""

    def forward(self, x: Tensor) -> Tensor:
        v = nn.functional.avg_pool2d(x.float(), 4) / 16.0 - 8.0
        return torch.cat([v, -v, v * 0.5, v * 0.0 + 1.0], 1)


class DyadicHyperEncoder(nn.Module):
    """z = sum of |y| over channels and 2x2 cells / 4: exact in float32 for integer y."""

    def forward(self, y: Tensor) -> Tensor:
        return nn.functional.avg_pool2d(y.abs().sum(1, keepdim=True), 2, ceil_mode=True)


class DyadicHyperDecoder(nn.Module):
    """scales = 0.75 + z / 2 per channel, upsampled to the latent grid (4 x 4 -> 4 x 4)."""

    def forward(self, z: Tensor) -> Tensor:
        up = nn.functional.interpolate(z, scale_factor=2.0, mode="nearest")[:, :, :4, :4]
        return (0.75 + up.abs() * 0.5).repeat(1, 4, 1, 1)


# -- a wrong hyperprior is refused, naming the tensor ----------------------------------------

class FlatScales(nn.Module):
    def forward(self, z: Tensor) -> Tensor:
        return z.flatten(1)


class BatchDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 2, 3, 2, 1)

    def forward(self, y: Tensor) -> Tensor:
        return self.conv(y) - self.conv(y).mean(0, keepdim=True)


@pytest.mark.parametrize("case, match", [
    ("negative", "'scales' must be finite and > 0"),
    ("shape", "'scales' is float32"),
    ("batch", "'hyper_latent' depends on the batch composition"),
    ("vae", "a vae takes latent_model=Factorized"),
])
def test_wrong_hyperpriors_are_refused(case: str, match: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = digits(16)
    h_a: nn.Module = HyperEncoder()
    h_s: nn.Module = HyperDecoder(shift=-100.0 if case == "negative" else 0.0)
    if case == "shape":
        h_s = FlatScales()
    if case == "batch":
        h_a = BatchDependent()
    with pytest.raises(InvalidInput, match=match):
        export_model(family="vae" if case == "vae" else "ae", encoder=Encoder(),
                     decoder=Decoder(), images=x, latent_model=Hyperprior(h_a, h_s),
                     repo=tmp_path, name="bad", version=1)
    assert not (tmp_path / "bad").exists()
    _ = Factorized  # the factorized path is tested in test_custom_export


class BoundaryHyper(NoisyHyper):
    """Scales with one element on an index boundary of each of the 16 offsets."""

    def hyper_scales(self, z: np.ndarray) -> np.ndarray:
        s = self._rt.hyper_scales(z).astype(np.float64)
        spec = self._rt.manifest.hyperprior
        flat = s.reshape(len(s), -1)
        for j in range(16):
            flat[:, j] = boundary_scale(spec, 20 + j, j)
        return flat.reshape(s.shape)


def test_scales_on_every_offsets_boundary_fall_back_to_kind_1(repo: Path) -> None:
    pipe = Pipeline(repo, ONE_THREAD)
    x = digits(6, seed=13)
    runtime = pipe.runtime("hp")
    codes = LatentCodec(BoundaryHyper(runtime, 0.0)).encode(runtime.encode(x))  # type: ignore[arg-type]
    assert {parse_header(c).kind for c in codes} == {FACTORIZED}
    assert np.array_equal(pipe.reconstruct(codes), runtime.decode(runtime.encode(x)))
