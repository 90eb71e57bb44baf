"""The model manifest: the one file that tells a runtime everything about a model.

Layout (``models/<name>/<version>/manifest.json``), schema 1::

    {
      "schema": 1,
      "name": "mnist-vqvae", "version": 1, "family": "ae" | "vae" | "vqvae",
      "image":  {"channels": 1, "height": 28, "width": 28},   # uint8 NCHW in, x/255 in-graph
             or {"channels": 3, "size": "any", "stride": 16, "padding": "edge"}
      "latent": {"shape": [C, h, w]},                       # vqvae: [h, w] index grid
             or {"channels": M} with an any-size image: (M, ceil(H/16), ceil(W/16))
      "files":  {"encoder": {"path": "encoder.onnx", "sha256": "..."},
                 "decoder": {...}, "prior": {...} (vqvae only),
                 "prior_step": {...} (vqvae, optional: newer exports),
                 "sampler": {...} (sampling kind "learned"),
                 "check": {...} (optional: values recorded at export,
                             worker/runtime/model_check.py)},
      "onnx":   {"opset": 17},
      "code":   {"kind": "factorized" | "vq_static" | "vq_prior" | "vq_parallel"
                           | "hyperprior", ...tables, see CodeSpec},
      "sampling": {"kind": "gmm" | "gaussian" | "prior" | "learned" | "none", ...},
      "quality":  {"val_psnr_db": ..., "val_bits_per_image": ..., ...},
      "training": {"data_sha256": ..., "config": {...}}
    }

Image size. A fixed-size model (the MNIST zoo) takes exactly ``height`` x ``width``. An
any-size model (``"size": "any"``, ae only, code kind factorized) is fully convolutional
with spatial ``stride`` s: an H x W image is padded on the bottom and right to the next
multiples of s by repeating its last row and column (``"padding": "edge"``), its latent
is (M, ceil(H/s), ceil(W/s)), and the decoder's output is cropped back to H x W. Its codes
are format version 2, which records H and W (docs/code-format.md). Sampling
``{"kind": "none"}``: the model has no generative prior, ``operations`` lacks "sample".

Sampling kinds: "gmm" (ae: a diagonal Gaussian mixture over the flattened latent,
``weights``, ``means``, ``stds``), "gaussian" (vae: latent ~ N(0, I), times the
temperature), "prior" (vqvae: ancestral sampling from ``prior``), "learned" (vae, or a
fixed-size ae with code kind "factorized": a learned sampling prior,
``{"kind": "learned", "noise_dim": d, "method": "..."}``: noise u ~ N(0, I) of d numbers,
times the temperature, through ``files.sampler`` gives the latent the decoder takes (an
ae's: the encoder's continuous latent, which the runtime rounds onto the tables' support
before decoding, as it does a "gmm" draw); e.g. the second stage of a two-stage VAE, Dai &
Wipf 2019).
The sampler only draws: compression (encoder, decoder, code tables) does not use it.

ONNX I/O contract (dynamic batch axis N everywhere; H and W dynamic too for any-size):

- encoder: input ``image`` uint8 (N, C, H, W) -> ``latent`` float32 (N, C', h, w) for
  ae / vae (the vae's posterior mean), or ``indices`` int64 (N, h, w) for vqvae.
- decoder: ``latent`` float32 (N, C', h, w) or ``indices`` int64 (N, h, w) ->
  ``image`` float32 (N, C, H, W) in [0, 1].
- prior (vqvae): ``indices`` int64 (N, h, w) -> ``logits`` float32 (N, K, h, w), causal
  in raster order (the logits at a position depend only on earlier positions).
- hyper_encoder (code kind hyperprior): ``latent`` float32 (N, C', h, w), the rounded
  latent y_hat (or the float y where code.hyperprior.z.input is "latent") -> ``hyper_latent``
  float32 (N, Cz, hz, wz); hyper_decoder: ``hyper_latent``
  float32 (the rounded z) -> ``scales`` float32 (N, C', h, w), > 0. Or, instead of
  hyper_decoder, ``hyper_decoder_int``: an integer network file (worker/codec/intnet.py)
  z -> integers compared with its thresholds (exact on every machine). An any-size
  model's hyper_encoder sees its input zero-padded to multiples of z.stride, and the
  hyper-decoder's output is cropped back to y's grid.
- prior_step (optional): ``indices`` int64 (N, h, w), ``position`` int64 scalar p,
  ``cache0``.. float32 (N, h*w + 1, C) -> ``logits`` float32 (N, K) at p and
  ``feat0``.. float32 (N, C), the layer activations at p, which the caller writes into
  row p of its caches; row h*w stays zero (export/nets/prior_step.py). Reads only positions
  < p of indices and caches.
- sampler (sampling kind "learned"): ``noise`` float32 (N, d) -> ``latent`` float32
  (N, C', h, w), the decoder's latent shape; row i depends on noise row i alone.
- prior of a ``vq_parallel`` model (code.vq_parallel.schedule: S groups of raster
  positions): ``indices`` int64 (N, h, w), ``group`` int64 scalar g -> ``logits`` float32
  (N, P, K), the logits at group g's positions in schedule order (P: the largest group;
  the columns past group g's size are padding). Reads only the positions of groups < g
  (export/nets/parallel_prior.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from latentserve.errors import ModelIntegrityError

SCHEMA_VERSION = 1
FAMILIES = ("ae", "vae", "vqvae")
OPERATIONS = ("compress", "reconstruct", "sample")
PADDINGS = ("edge",)
CODE_KINDS = ("factorized", "vq_static", "vq_prior", "vq_parallel", "hyperprior")
# Integer code-kind ids written into each latent code's header.
CODE_KIND_IDS = {"factorized": 1, "vq_static": 2, "vq_prior": 3, "vq_parallel": 4,
                 "hyperprior": 5}
PRIOR_KINDS = ("vq_prior", "vq_parallel")  # kinds coded under a float prior's logits
SAMPLING_KINDS = ("gmm", "gaussian", "prior", "learned", "none")

Family = Literal["ae", "vae", "vqvae"]


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str


@dataclass(frozen=True)
class FactorizedSpec:
    """Quantised continuous latents, each channel coded under its own integer table.

    symbol = clip(round(latent / step), offsets[c], offsets[c] + len(freqs[c]) - 1);
    latent_hat = symbol * step. ``freqs[c][i]`` is the integer frequency of symbol
    ``offsets[c] + i`` (all >= 1).
    """

    step: float
    offsets: tuple[int, ...]
    freqs: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class VQStaticSpec:
    """VQ indices coded under one integer table per grid position (``freqs[h*w][K]``, all >= 1)."""

    num_codes: int
    freqs: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class VQPriorSpec:
    """VQ indices coded under the autoregressive prior's logits, quantised to integers.

    Per position: q = round(logit * logit_scale + j / 16) with a per-image offset j;
    d = max(q) - q; weight = lut[min(d, len(lut) - 1)]. The encoder picks the first j for
    which no logit lies within ``guard`` of a rounding boundary whose crossing would
    change a weight (else it falls back to the static tables), so float noise below
    ``guard`` cannot change a table. Details: docs/code-format.md.
    """

    logit_scale: float
    guard: float
    lut: tuple[int, ...]
    # vq_parallel only: the decoding order, S groups of raster positions (y * w + x) that
    # partition the grid; the prior predicts a group from the groups before it.
    schedule: tuple[tuple[int, ...], ...] = ()

    def order(self, positions: int) -> list[int]:
        """The positions in coding order: the schedule's groups in turn, else raster."""
        if self.schedule:
            return [p for g in self.schedule for p in g]
        return list(range(positions))


@dataclass(frozen=True)
class HyperpriorSpec:
    """A scale hyperprior (Balle 2018): z = round(hyper_encoder(y_hat)) coded under z's
    factorized tables (``z_offsets``, ``z_freqs``, grid ``z_shape``), then each y symbol
    under one of ``levels`` integer Gaussian tables (``tables[i][v - y_offset]``, for the
    scale exp(linspace(ln scale_min, ln scale_max, levels))[i]), picked by the quantised
    log-scale of ``hyper_decoder(z)`` with a per-image offset that keeps every scale
    ``guard`` (in units of ln scale) from an index boundary. A model whose files hold
    ``hyper_decoder_int`` (an integer network, worker/codec/intnet.py) picks the indices
    exactly instead (no offset, no guard); it may be any-size, with z's grid ``z_stride``
    times coarser than y's (``z_shape`` (Cz, 0, 0)). Details: docs/code-format.md.
    """

    z_shape: tuple[int, int, int]
    z_offsets: tuple[int, ...]
    z_freqs: tuple[tuple[int, ...], ...]
    scale_min: float
    scale_max: float
    levels: int
    guard: float
    y_offset: int
    tables: tuple[tuple[int, ...], ...]
    z_stride: int = 0
    # What the hyper-encoder reads: "symbols" (y_hat) or "latent" (the float y before
    # rounding, the input CompressAI trains h_a on; the photo hyperprior's).
    z_input: str = "symbols"

    def z_shape_for(self, latent_hw: tuple[int, int]) -> tuple[int, int, int]:
        """z's grid for a y grid of (h, w): ``z_shape``, or ceil(h, w / z_stride)."""
        if not self.z_stride:
            return self.z_shape
        s = self.z_stride
        return (self.z_shape[0], -(-latent_hw[0] // s), -(-latent_hw[1] // s))


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. ``digest`` is the sha256 of the manifest file's bytes."""

    name: str
    version: int
    family: Family
    image_shape: tuple[int, int, int]
    latent_shape: tuple[int, ...]
    files: dict[str, FileEntry]
    code_kind: str
    factorized: FactorizedSpec | None
    vq_static: VQStaticSpec | None
    vq_prior: VQPriorSpec | None
    sampling: dict[str, Any]
    quality: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)
    digest: str = ""
    vq_parallel: VQPriorSpec | None = None
    hyperprior: HyperpriorSpec | None = None
    # 0: fixed size (image_shape, latent_shape as given); s > 0: any size, padded to
    # multiples of s, and image_shape / latent_shape hold 0 for H, W, h, w.
    stride: int = 0

    @property
    def any_size(self) -> bool:
        return self.stride > 0

    @property
    def noise_dim(self) -> int:
        """The learned sampler's noise size d (sampling kind "learned"), else 0."""
        return int(self.sampling["noise_dim"]) if self.sampling.get("kind") == "learned" else 0

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def operations(self) -> tuple[str, ...]:
        """What the model can do: compress and reconstruct always; sample with a prior."""
        can_sample = self.sampling.get("kind", "none") != "none"
        return OPERATIONS if can_sample else OPERATIONS[:2]

    def describe_size(self) -> str:
        """``L 28x28`` or ``RGB, any size (padded to multiples of 16)``."""
        mode = {1: "L", 3: "RGB"}.get(self.channels, f"{self.channels}-channel")
        if self.any_size:
            return f"{mode}, any size (padded to multiples of {self.stride})"
        return f"{mode} {self.image_shape[2]}x{self.image_shape[1]}"

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the networks run at: (H, W) rounded up to multiples of the stride."""
        s = self.stride or 1
        return -(-height // s) * s, -(-width // s) * s

    def latent_shape_for(self, height: int, width: int) -> tuple[int, ...]:
        """One image's symbol shape: ``latent_shape``, or (M, ceil(H/s), ceil(W/s))."""
        if not self.any_size:
            return self.latent_shape
        ph, pw = self.padded_size(height, width)
        return (self.latent_shape[0], ph // self.stride, pw // self.stride)

    @property
    def ref(self) -> str:
        """``name:version``, the form requests use."""
        return f"{self.name}:{self.version}"

    @property
    def fingerprint(self) -> bytes:
        """The bytes of the manifest digest that every latent code carries."""
        return bytes.fromhex(self.digest)[:2]

    @property
    def num_symbols(self) -> int:
        n = 1
        for s in self.latent_shape:
            n *= s
        return n


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_fields(*, name: str, version: int, family: str, image_shape: Any,
                  latent_shape: list[int], folder: Path, files: dict[str, str], opset: int,
                  producer: str, code: dict[str, Any], sampling: dict[str, Any],
                  stride: int = 0) -> dict[str, Any]:
    """The writing half of the schema: the fields every export writes, with each file's
    digest; the exporter adds its provenance (``training``, ``source``) and, once
    measured, ``quality``. ``parse_manifest`` reads them back (and the writer runs it on
    the final text, so nothing is written that a runtime would refuse). ``stride`` > 0
    writes an any-size model (image size "any", latent channels ``latent_shape[0]``)."""
    size: dict[str, Any] = ({"size": "any", "stride": stride, "padding": "edge"} if stride
                            else {"height": image_shape[1], "width": image_shape[2]})
    return {
        "schema": SCHEMA_VERSION, "name": name, "version": version, "family": family,
        "image": {"channels": image_shape[0], **size, "dtype": "uint8",
                  "normalization": "x / 255 inside the encoder; decoder output in [0, 1]"},
        "latent": {"channels": latent_shape[0]} if stride else {"shape": latent_shape},
        "files": {role: {"path": f, "sha256": sha256_file(folder / f)}
                  for role, f in files.items()},
        "onnx": {"opset": opset, "dynamic_axes": {"batch": 0}, "producer": producer},
        "code": code, "sampling": sampling, "quality": {},
    }


def _schedule(raw: Any, latent_shape: tuple[int, ...], where: str
              ) -> tuple[tuple[int, ...], ...]:
    """code.vq_parallel.schedule: non-empty groups of raster positions that partition the
    (h, w) grid, each exactly once; ModelIntegrityError naming what is wrong otherwise."""
    if len(latent_shape) != 2:
        raise ModelIntegrityError(f"{where}: a vq_parallel schedule needs an (h, w) grid, "
                                  f"the latent is {latent_shape}")
    positions = latent_shape[0] * latent_shape[1]
    if (not isinstance(raw, list) or not raw
            or any(not isinstance(g, list) or not g for g in raw)
            or any(not isinstance(p, int) or isinstance(p, bool) for g in raw for p in g)):
        raise ModelIntegrityError(f"{where}: code.vq_parallel.schedule must be a non-empty "
                                  "list of non-empty lists of grid positions (integers)")
    flat = sorted(p for g in raw for p in g)
    if flat != list(range(positions)):
        missing = sorted(set(range(positions)) - set(flat))[:5]
        repeated = sorted({p for p in flat if flat.count(p) > 1})[:5]
        outside = [p for p in flat if not 0 <= p < positions][:5]
        raise ModelIntegrityError(
            f"{where}: code.vq_parallel.schedule must list each of the {positions} grid "
            f"positions exactly once (missing {missing}, repeated {repeated}, outside "
            f"{outside})")
    return tuple(tuple(g) for g in raw)


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ModelIntegrityError(f"manifest {where} is missing the field {key!r}")
    return d[key]


def parse_manifest(data: bytes, *, where: str = "manifest.json") -> Manifest:
    """Parse and validate manifest bytes; raise ModelIntegrityError naming what is wrong."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIntegrityError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelIntegrityError(f"{where} must hold a JSON object")
    schema = _need(raw, "schema", where)
    if schema != SCHEMA_VERSION:
        raise ModelIntegrityError(
            f"{where} has schema {schema!r}; this build reads schema {SCHEMA_VERSION}")
    family = _need(raw, "family", where)
    if family not in FAMILIES:
        raise ModelIntegrityError(f"{where}: family {family!r} is not one of {FAMILIES}")
    image = _need(raw, "image", where)
    latent = _need(raw, "latent", where)
    stride = 0
    if image.get("size") == "any":
        stride = int(_need(image, "stride", where + " image"))
        if stride < 1 or family != "ae" or image.get("padding", "edge") not in PADDINGS:
            raise ModelIntegrityError(
                f"{where}: an any-size image needs family 'ae', a stride >= 1 and padding "
                f"one of {PADDINGS}; got family {family!r}, stride {stride}, padding "
                f"{image.get('padding')!r}")
        image_shape = (int(image["channels"]), 0, 0)
        latent_shape: tuple[int, ...] = (int(_need(latent, "channels", where + " latent")), 0, 0)
    else:
        image_shape = (int(image["channels"]), int(image["height"]), int(image["width"]))
        latent_shape = tuple(int(s) for s in latent["shape"])
    if image_shape[0] not in (1, 3):
        raise ModelIntegrityError(f"{where}: image channels must be 1 or 3, got {image_shape[0]}")
    files = {k: FileEntry(path=v["path"], sha256=v["sha256"])
             for k, v in _need(raw, "files", where).items()}
    for needed in ("encoder", "decoder") + (("prior",) if family == "vqvae" else ()):
        if needed not in files:
            raise ModelIntegrityError(f"{where}: files lacks {needed!r}")
    code = _need(raw, "code", where)
    kind = _need(code, "kind", where + " code")
    if kind not in CODE_KINDS:
        raise ModelIntegrityError(f"{where}: code kind {kind!r} is not one of {CODE_KINDS}")
    fac = vqs = vqp = None
    if "factorized" in code:
        f = code["factorized"]
        fac = FactorizedSpec(step=float(f["step"]), offsets=tuple(int(o) for o in f["offsets"]),
                             freqs=tuple(tuple(int(x) for x in row) for row in f["freqs"]))
        if len(fac.offsets) != latent_shape[0] or len(fac.freqs) != latent_shape[0]:
            raise ModelIntegrityError(
                f"{where}: factorized tables cover {len(fac.freqs)} channels, "
                f"latent has {latent_shape[0]}")
    if "vq_static" in code:
        s = code["vq_static"]
        vqs = VQStaticSpec(num_codes=int(s["num_codes"]),
                           freqs=tuple(tuple(int(x) for x in row) for row in s["freqs"]))
    if "vq_prior" in code:
        p = code["vq_prior"]
        vqp = VQPriorSpec(logit_scale=float(p["logit_scale"]), guard=float(p["guard"]),
                          lut=tuple(int(x) for x in p["lut"]))
    vqpar = None
    if "vq_parallel" in code:
        p = code["vq_parallel"]
        vqpar = VQPriorSpec(logit_scale=float(p["logit_scale"]), guard=float(p["guard"]),
                            lut=tuple(int(x) for x in p["lut"]),
                            schedule=_schedule(_need(p, "schedule", where + " code.vq_parallel"),
                                               latent_shape, where))
    for tables in ([fac.freqs] if fac else []) + ([vqs.freqs] if vqs else []):
        if any(min(row) < 1 for row in tables):
            raise ModelIntegrityError(f"{where}: every integer frequency must be >= 1")
    hyp = None
    if kind == "hyperprior":
        hyp = _hyperprior_spec(code, where)
        if family == "vqvae" or fac is None:
            raise ModelIntegrityError(f"{where}: code kind 'hyperprior' needs an ae or vae "
                                      "and code.factorized (its fallback tables)")
        exact = "hyper_decoder_int" in files
        for needed in ("hyper_encoder", "hyper_decoder_int" if exact else "hyper_decoder"):
            if needed not in files:
                raise ModelIntegrityError(f"{where}: files lacks {needed!r} (code kind "
                                          "'hyperprior')")
        if bool(stride) != bool(hyp.z_stride) or (stride and not exact):
            raise ModelIntegrityError(
                f"{where}: an any-size hyperprior needs code.hyperprior.z.stride and an "
                "integer hyper_decoder_int (a float one cannot pick the same tables on "
                "every machine for a photo's many scales); a fixed-size one has neither "
                "z.stride")
        if fac.step != 1.0:
            raise ModelIntegrityError(f"{where}: a hyperprior codes the rounded latent: "
                                      f"code.factorized.step must be 1, got {fac.step}")
        top = [o + len(f) - 1 for o, f in zip(fac.offsets, fac.freqs, strict=True)]
        if min(fac.offsets) < hyp.y_offset or max(top) >= hyp.y_offset + len(hyp.tables[0]):
            raise ModelIntegrityError(f"{where}: the factorized support [{min(fac.offsets)}, "
                                      f"{max(top)}] is not inside the hyperprior tables' "
                                      f"[{hyp.y_offset}, {hyp.y_offset + len(hyp.tables[0]) - 1}]")
    elif kind == "factorized" and fac is None or kind != "factorized" and vqs is None:
        raise ModelIntegrityError(f"{where}: code kind {kind!r} has no tables")
    if kind == "vq_prior" and vqp is None:
        raise ModelIntegrityError(f"{where}: code kind 'vq_prior' needs code.vq_prior")
    if kind == "vq_parallel" and vqpar is None:
        raise ModelIntegrityError(f"{where}: code kind 'vq_parallel' needs code.vq_parallel")
    if kind in PRIOR_KINDS and family != "vqvae":
        raise ModelIntegrityError(f"{where}: code kind {kind!r} is for family 'vqvae'")
    if stride and kind not in ("factorized", "hyperprior"):
        raise ModelIntegrityError(f"{where}: an any-size model codes kind 'factorized' or "
                                  "'hyperprior' only")
    sampling = dict(raw.get("sampling", {}))
    _check_sampling(sampling, family, files, where, code_kind=kind, any_size=bool(stride))
    return Manifest(
        name=str(_need(raw, "name", where)), version=int(_need(raw, "version", where)),
        family=family, image_shape=image_shape, latent_shape=latent_shape, files=files,
        code_kind=kind, factorized=fac, vq_static=vqs, vq_prior=vqp, vq_parallel=vqpar,
        sampling=sampling, quality=dict(raw.get("quality", {})),
        raw=raw, digest=hashlib.sha256(data).hexdigest(), stride=stride, hyperprior=hyp)


def _hyperprior_spec(code: dict[str, Any], where: str) -> HyperpriorSpec:
    """code.hyperprior, read and checked for shape (the codec checks the numbers)."""
    h = _need(code, "hyperprior", where + " code")
    try:
        z = h["z"]
        spec = HyperpriorSpec(
            z_shape=tuple(int(s) for s in z["shape"]),  # type: ignore[arg-type]
            z_offsets=tuple(int(o) for o in z["offsets"]),
            z_freqs=tuple(tuple(int(x) for x in row) for row in z["freqs"]),
            scale_min=float(h["scale_min"]), scale_max=float(h["scale_max"]),
            levels=int(h["levels"]), guard=float(h["guard"]), y_offset=int(h["y_offset"]),
            tables=tuple(tuple(int(x) for x in row) for row in h["tables"]),
            z_stride=int(z.get("stride", 0)), z_input=str(z.get("input", "symbols")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelIntegrityError(f"{where}: code.hyperprior is malformed ({type(exc).__name__}: "
                                  f"{exc}); it needs z {{shape, offsets, freqs}}, scale_min, "
                                  "scale_max, levels, guard, y_offset, tables") from None
    if len(spec.z_shape) != 3 or len(spec.z_offsets) != spec.z_shape[0] \
            or len(spec.z_freqs) != spec.z_shape[0] or spec.z_stride < 0 \
            or (spec.z_stride > 0) != (spec.z_shape[1:] == (0, 0)):
        raise ModelIntegrityError(f"{where}: code.hyperprior.z needs a (C, h, w) shape and "
                                  f"one table per channel (an any-size z: shape (C, 0, 0) "
                                  f"and a stride); got shape {spec.z_shape}, "
                                  f"{len(spec.z_freqs)} tables, stride {spec.z_stride}")
    if spec.z_input not in ("symbols", "latent"):
        raise ModelIntegrityError(f"{where}: code.hyperprior.z.input must be 'symbols' or "
                                  f"'latent', got {spec.z_input!r}")
    if not spec.tables or any(min(row, default=0) < 1 for row in spec.tables + spec.z_freqs):
        raise ModelIntegrityError(f"{where}: every hyperprior frequency must be >= 1")
    return spec


def _check_sampling(sampling: dict[str, Any], family: str, files: dict[str, FileEntry],
                    where: str, *, code_kind: str = "factorized", any_size: bool = False
                    ) -> None:
    """The ``sampling`` block: a known kind; "learned" needs a vae (or a fixed-size,
    factorized ae), a sampler file and d."""
    kind = sampling.get("kind", "none")
    if kind not in SAMPLING_KINDS:
        raise ModelIntegrityError(
            f"{where}: sampling kind {kind!r} is not one of {SAMPLING_KINDS}")
    if kind != "learned":
        if "sampler" in files:
            raise ModelIntegrityError(
                f"{where}: files names a 'sampler' but sampling kind is {kind!r}, not 'learned'")
        return
    # An ae's sampler gives the continuous latent that the runtime rounds onto its
    # factorized tables (as a "gmm" draw is); an any-size ae has no one latent shape.
    if family not in ("vae", "ae") or (family == "ae" and (code_kind != "factorized"
                                                          or any_size)):
        raise ModelIntegrityError(
            f"{where}: sampling kind 'learned' is for a vae or a fixed-size ae with code "
            f"kind 'factorized', not {'an any-size ' if any_size else 'a '}{family} with "
            f"code kind {code_kind!r}")
    if "sampler" not in files:
        raise ModelIntegrityError(f"{where}: sampling kind 'learned' needs files.sampler")
    dim = sampling.get("noise_dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ModelIntegrityError(
            f"{where}: sampling kind 'learned' needs an integer noise_dim >= 1, got {dim!r}")
