"""What a careful operator runs before putting a model live (``latentserve models check``).

At export the writer records, in the model's ``check.npz`` (manifest role ``check``,
digest-checked like the ONNX files), a few images and what the graphs gave on them:
the encoder's raw output, the decoder's float output on the encoder's symbols, the prior's
logits (vqvae) and the codes. ``check_model`` then gives one ``Verdict`` per check:

- digests: every file's sha256 against the manifest;
- parity: the graphs on this machine and provider against the recorded values, and the
  recorded codes decode to the symbols of the recorded images;
- round trip: images (given, else the recorded ones, else the model's own samples) ->
  codes -> symbols exactly -> images, PSNR beside the manifest's validation figure;
- batch invariance: each image's code is the same alone, in a batch and in another order;
- code size: payload bytes against the entropy estimate of the integer tables;
- throughput: images/s of compress (encoder + coder) and reconstruct.

``check_at_load`` is the cheap part (recorded parity of the graphs, a few images), which
the server runs when it loads a model; models exported before ``check.npz`` pass it.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from latentserve.errors import LatentServeError, ModelIntegrityError
from latentserve.worker.runtime.quality import mean_psnr
from latentserve.worker.runtime.repository import ModelEntry, ModelRepository, verify_files

CHECK_ROLE = "check"
CHECK_FILE = "check.npz"
RECORD_IMAGES = 4
# Other kernels (another provider, another CPU) move floats a little; these bound it.
LATENT_TOLERANCE = 1e-3    # relative to the latent's scale
IMAGE_TOLERANCE = 1e-3     # decoder output in [0, 1]: a quarter of a grey level
LOGIT_TOLERANCE = 1e-3     # relative to the logits' scale
INDEX_AGREEMENT = 0.99     # vqvae: share of recorded indices the encoder must reproduce
PSNR_MARGIN_DB = 3.0
FLUSH_BYTES = 2.0          # the coder's flush on top of the tables' cost, per code

Status = Literal["PASS", "WARN", "FAIL", "SKIP"]


@dataclass(frozen=True)
class Verdict:
    """One check's outcome: ``status``, a sentence, and the measured figures."""

    check: str
    status: Status
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


# -- the record written at export ----------------------------------------------------------

def _encoder_input(runtime: Any) -> str:
    return "indices" if runtime.manifest.family == "vqvae" else "latent"


def _decoder_feed(runtime: Any, symbols: np.ndarray) -> np.ndarray:
    if runtime.manifest.family == "vqvae":
        return symbols.astype(np.int64)
    spec = runtime.manifest.factorized
    return symbols.astype(np.float32) * np.float32(spec.step)


def graph_outputs(runtime: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """The raw graph outputs on ``images`` that the record holds (and parity compares)."""
    raw = runtime._run(runtime.encoder, "image", runtime.check_images(images))
    symbols = runtime.encode(images)
    out = {"images": images, "encoder": raw,
           "decoder": runtime._run(runtime.decoder, _encoder_input(runtime),
                                   _decoder_feed(runtime, symbols))}
    if runtime.prior is not None and runtime.manifest.code_kind == "vq_parallel":
        out["logits"] = runtime.parallel_logits(symbols.astype(np.int64))
    elif runtime.prior is not None:
        out["logits"] = runtime.prior_logits(symbols.astype(np.int64))
    if getattr(runtime, "sampler", None) is not None:  # a vae's learned sampling prior
        out["sampler"] = runtime._run(runtime.sampler, "noise",
                                      record_noise(runtime.manifest.noise_dim))
    return out


def record_noise(dim: int) -> np.ndarray:
    """The fixed sampler input the record holds the output of: float32 (4, dim)."""
    return np.random.default_rng(0).standard_normal((RECORD_IMAGES, dim)).astype(np.float32)


def make_record(runtime: Any, codec: Any, images: np.ndarray) -> bytes:
    """The bytes of ``check.npz`` for the first ``RECORD_IMAGES`` of ``images``."""
    images = np.ascontiguousarray(images[:RECORD_IMAGES])
    arrays = graph_outputs(runtime, images)
    # Payloads, not whole codes: a code's header names the manifest's digest, and the
    # manifest names this file's digest.
    coded = codec.encode_payloads(runtime.encode(images), size=_size(runtime, images))
    arrays["code_kinds"] = np.array([k for k, _ in coded], np.int64)
    arrays["code_bytes"] = np.frombuffer(b"".join(p for _, p in coded), np.uint8)
    arrays["code_lengths"] = np.array([len(p) for _, p in coded], np.int64)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)  # numeric arrays; read back without pickle
    return buf.getvalue()


def _size(runtime: Any, images: np.ndarray) -> tuple[int, int] | None:
    """The check images' (H, W) for an any-size model's codes (format 2), else None.
    An any-size model's check images are multiples of its stride, so the raw graph
    outputs are those of the images themselves."""
    if not runtime.manifest.any_size:
        return None
    return int(images.shape[2]), int(images.shape[3])


def read_record(entry: ModelEntry) -> dict[str, np.ndarray] | None:
    """The model's recorded check values, or None for a model exported without them."""
    if CHECK_ROLE not in entry.manifest.files:
        return None
    try:
        with np.load(entry.file(CHECK_ROLE), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ModelIntegrityError(f"{entry.manifest.ref}: {entry.file(CHECK_ROLE)} is not a "
                                  f"readable check record: {exc}") from None


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(1.0, float(np.abs(a).max(initial=0.0)))
    return float(np.abs(a.astype(np.float64) - b).max(initial=0.0)) / scale


def parity_figures(runtime: Any, record: dict[str, np.ndarray]) -> dict[str, float]:
    """Differences between the graphs now and the record; raises naming what is off."""
    ref = runtime.manifest.ref
    try:
        now = graph_outputs(runtime, record["images"])
    except LatentServeError as exc:
        raise ModelIntegrityError(
            f"{ref}: the recorded check images no longer run: {exc}") from None
    fig: dict[str, float] = {}
    enc, want = now["encoder"], record["encoder"]
    if enc.shape != want.shape:
        raise ModelIntegrityError(f"{ref}: encoder output has shape {enc.shape}, the record "
                                  f"{want.shape}")
    if runtime.manifest.family == "vqvae":
        fig["encoder_index_agreement"] = float((enc == want).mean())
        if fig["encoder_index_agreement"] < INDEX_AGREEMENT:
            raise ModelIntegrityError(
                f"{ref}: encoder output 'indices' matches the recorded indices at only "
                f"{fig['encoder_index_agreement']:.1%} of the positions (need "
                f"{INDEX_AGREEMENT:.0%}): this is not the exported encoder's arithmetic")
    else:
        fig["encoder_rel_diff"] = _rel(want, enc)
        if fig["encoder_rel_diff"] > LATENT_TOLERANCE:
            raise ModelIntegrityError(
                f"{ref}: encoder output 'latent' differs from the recorded values by "
                f"{fig['encoder_rel_diff']:.3g} (relative; limit {LATENT_TOLERANCE})")
    # The decoder and prior are compared on the recorded inputs' symbols as computed now;
    # where they equal the recorded symbols the outputs must match.
    same = np.array_equal(runtime.encode(record["images"]).astype(np.int64),
                          _recorded_symbols(runtime, record))
    if same:
        fig["decoder_abs_diff"] = float(np.abs(now["decoder"] - record["decoder"]).max())
        if fig["decoder_abs_diff"] > IMAGE_TOLERANCE:
            raise ModelIntegrityError(
                f"{ref}: decoder output 'image' differs from the recorded values by "
                f"{fig['decoder_abs_diff']:.3g} (limit {IMAGE_TOLERANCE})")
        if "logits" in record:
            fig["prior_rel_diff"] = _rel(record["logits"], now["logits"])
            if fig["prior_rel_diff"] > LOGIT_TOLERANCE:
                raise ModelIntegrityError(
                    f"{ref}: prior output 'logits' differs from the recorded values by "
                    f"{fig['prior_rel_diff']:.3g} (relative; limit {LOGIT_TOLERANCE})")
    if "sampler" in record and "sampler" in now:
        fig["sampler_rel_diff"] = _rel(record["sampler"], now["sampler"])
        if fig["sampler_rel_diff"] > LATENT_TOLERANCE:
            raise ModelIntegrityError(
                f"{ref}: sampler output 'latent' differs from the recorded values by "
                f"{fig['sampler_rel_diff']:.3g} (relative; limit {LATENT_TOLERANCE})")
    return fig


def _recorded_symbols(runtime: Any, record: dict[str, np.ndarray]) -> np.ndarray:
    enc = record["encoder"]
    if runtime.manifest.family == "vqvae":
        return enc.astype(np.int64)
    symbols: np.ndarray = runtime.quantize(enc)
    return symbols.astype(np.int64)


def recorded_codes(runtime: Any, record: dict[str, np.ndarray]) -> list[bytes]:
    """The recorded payloads as this model's codes (headers made for its manifest)."""
    from latentserve.worker.codec.codes import pack

    data = record["code_bytes"].tobytes()
    size = _size(runtime, record["images"])
    out, at = [], 0
    for kind, n in zip(record["code_kinds"].tolist(), record["code_lengths"].tolist(), strict=True):
        out.append(pack(runtime.manifest.digest, int(kind), data[at:at + n], size))
        at += n
    return out


def check_at_load(runtime: Any) -> None:
    """The cheap load-time check: recorded graph parity (no-op for models without a record)."""
    record = read_record(runtime.entry)
    if record is not None:
        parity_figures(runtime, record)


# -- the full check ---------------------------------------------------------------------------

def _timed(fn: Any, budget_s: float) -> tuple[float, int]:
    """(seconds per call, calls) of ``fn`` run until ``budget_s`` is spent (at least once)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        spent = time.perf_counter() - start
        if spent >= budget_s:
            return spent / calls, calls


def check_model(repository: ModelRepository, ref: str, *, images: np.ndarray | None = None,
                engine_config: Any = None, timing_s: float = 1.0) -> list[Verdict]:
    """Every check of ``ref`` (``name[:version]``); one Verdict each, in a fixed order."""
    from latentserve.worker.codec.codes import HEADER_SIZE, LatentCodec, parse_header
    from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime

    entry = repository.resolve(ref)
    m = entry.manifest
    out: list[Verdict] = []
    try:
        verify_files(entry)
    except ModelIntegrityError as exc:
        out.append(Verdict("digests", "FAIL", str(exc)))
        return out + [Verdict(c, "SKIP", "the files are not the exported ones") for c in
                      ("parity", "round trip", "batch invariance", "code size", "throughput")]
    out.append(Verdict("digests", "PASS", f"{len(m.files)} files match the manifest's sha256"))
    runtime = ModelRuntime(entry, engine_config or EngineConfig())
    codec = LatentCodec(runtime)

    record = read_record(entry)
    if record is None:
        out.append(Verdict("parity", "SKIP", "no recorded values (exported before check.npz); "
                                              "re-export to record them"))
    else:
        try:
            fig = parity_figures(runtime, record)
            decoded = codec.decode(recorded_codes(runtime, record))
            if not np.array_equal(decoded.astype(np.int64), _recorded_symbols(runtime, record)):
                raise ModelIntegrityError("the recorded codes decode to other symbols than "
                                          "the recorded images encode to")
            detail = ", ".join(f"{k} {v:.3g}" for k, v in fig.items())
            out.append(Verdict("parity", "PASS", f"{runtime.provider}: {detail}; "
                               f"{len(decoded)} recorded codes decode", fig))
        except LatentServeError as exc:
            out.append(Verdict("parity", "FAIL", str(exc)))

    source = "given"
    if images is None and record is not None:
        images, source = record["images"], "recorded"
    elif images is None:
        images, source = runtime.sample(8, seed=0), "the model's own samples"
    images = runtime.check_images(images)

    size = _size(runtime, images)
    symbols = runtime.encode(images)
    codes = codec.encode(symbols, size=size)
    back = codec.decode(codes)
    recon = runtime.decode(back, size) if size else runtime.decode(back)
    psnr = mean_psnr(images, recon)
    fig = {"images": len(images), "psnr_db": round(psnr, 3),
           "bytes_per_image": round(float(np.mean([len(c) for c in codes])), 2)}
    val = m.quality.get("val_psnr_db")
    longer = codec.not_shortest(codes)
    if not np.array_equal(back, symbols):
        out.append(Verdict("round trip", "FAIL", "the codes decode to other symbols", fig))
    elif longer:
        out.append(Verdict("round trip", "FAIL", f"{len(longer)} of {len(codes)} payloads are "
                           "not the shortest the encoder should write (docs/code-format.md)",
                           fig))
    elif isinstance(val, (int, float)) and source == "given" and psnr < val - PSNR_MARGIN_DB:
        out.append(Verdict("round trip", "WARN", f"{len(images)} {source} images: PSNR "
                           f"{psnr:.2f} dB, {PSNR_MARGIN_DB} dB or more under the manifest's "
                           f"{val:.2f} dB: are these images like the model's data?", fig))
    else:
        vs = f" (manifest: {val:.2f} dB)" if isinstance(val, (int, float)) else ""
        out.append(Verdict("round trip", "PASS", f"{len(images)} {source} images: exact "
                           f"symbols, PSNR {psnr:.2f} dB{vs}, {fig['bytes_per_image']} "
                           "bytes/image", fig))

    alone = [codec.encode(runtime.encode(images[i:i + 1]), size=size)[0]
             for i in range(len(images))]
    rev = codec.encode(runtime.encode(images[::-1].copy()), size=size)[::-1]
    differ = sum(a != b or a != c for a, b, c in zip(codes, alone, rev, strict=True))
    out.append(Verdict("batch invariance", "FAIL" if differ else "PASS",
                       f"{differ} of {len(images)} codes change with the batch" if differ else
                       f"{len(images)} codes identical alone, batched and reversed",
                       {"codes_differing": differ}))

    kinds = [parse_header(c).kind for c in codes]
    estimate = codec.cross_entropy_bits(symbols, kinds, size=size) / 8
    payload = np.array([len(parse_header(c).payload) for c in codes], np.float64)
    # 7 bytes; format 2 (any-size models) adds its size field
    head_bytes = float(np.mean([len(c) for c in codes])) - float(payload.mean()) \
        if codes else float(HEADER_SIZE)
    fig = {"payload_bytes": round(float(payload.mean()), 2),
           "estimate_bytes": round(float(estimate.mean()), 2)}
    limit = estimate.mean() * 1.01 + FLUSH_BYTES
    out.append(Verdict("code size", "PASS" if payload.mean() <= limit else "FAIL",
                       f"payload {fig['payload_bytes']} bytes/image, entropy estimate "
                       f"{fig['estimate_bytes']} (limit 1% + {FLUSH_BYTES:g} bytes), header "
                       f"{head_bytes:g}", fig))

    batch = np.concatenate([images] * max(1, -(-64 // len(images))))[:64]
    enc_s, _ = _timed(lambda: codec.encode(runtime.encode(batch), size=size), timing_s / 2)
    batch_codes = codec.encode(runtime.encode(batch), size=size)
    dec_s, _ = _timed(lambda: runtime.decode(codec.decode(batch_codes), size), timing_s / 2)
    fig = {"compress_images_per_s": round(len(batch) / enc_s, 1),
           "reconstruct_images_per_s": round(len(batch) / dec_s, 1)}
    out.append(Verdict("throughput", "PASS", f"{runtime.provider}, batch {len(batch)}: "
                       f"compress {fig['compress_images_per_s']} images/s, reconstruct "
                       f"{fig['reconstruct_images_per_s']} images/s", fig))
    return out
