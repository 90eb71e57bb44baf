"""The pipeline: images <-> latent codes for every model of a repository.

``Pipeline(repository, engine_config)`` is what the gRPC service and the job worker
call; it is thread-safe and keeps one verified ``ModelRuntime`` (and its
``LatentCodec``) per model version:

- ``models()``: the repository's model versions.
- ``runtime(ref)`` / ``codec(ref)``: cached; a model's file digests are verified once.
- ``compress(ref, images, kind=None) -> list[bytes]``: uint8 (N, C, H, W) -> one code
  per image; for an any-size model also a list of (C, H, W) arrays of different sizes
  (grouped by size: one network run per size).
- ``reconstruct(codes, ref=None) -> uint8 (N, C, H, W)``: the model is read from each
  code, codes of several models are grouped; ``ref`` requires one model.
- ``reconstruct_each(codes, ref=None)``: per code an image or the ``CodeError`` that
  refused it (or ``ResourceLimit``: a format-2 code of an image over ``max_pixels``),
  so one bad code in a batch can be reported by its index.
- ``compress_staged`` / ``reconstruct_staged`` / ``sample_staged``: the same calls cut
  between the network and the coder (sample: between the draws and the decoder); the
  first half runs at once, the returned function runs the second, for a worker that
  overlaps one batch's coding with another's network.
- ``sample(ref, count, seed=, temperature=, start=) -> uint8 (N, C, H, W)``.
- ``identify(code) -> ModelEntry``: which model made a code, or why none can decode it.
"""

from __future__ import annotations

import functools
import operator
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from latentserve.errors import CodeError, CodeMismatch, CorruptCode, InvalidInput, ResourceLimit
from latentserve.worker.codec.coderpool import CoderPool
from latentserve.worker.codec.codes import (
    HEADER_SIZE,
    Header,
    LatentCodec,
    parse_header,
    with_index,
)
from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime, canonical_temperature
from latentserve.worker.runtime.images import DEFAULT_MAX_PIXELS
from latentserve.worker.runtime.repository import (
    ModelEntry,
    ModelRepository,
    read_registry,
    verify_files,
)


class Pipeline:
    """Compress, reconstruct and sample with the models of one repository."""

    def __init__(self, repository: ModelRepository | str | Path,
                 engine_config: EngineConfig | None = None, *,
                 coder_pool: CoderPool | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.repository = (repository if isinstance(repository, ModelRepository)
                           else ModelRepository(repository))
        self.engine_config = engine_config or EngineConfig()
        # Optional: large batches of kinds 1 and 2 coded in its processes (the caller
        # owns and closes it); without it every batch is coded in the calling thread.
        self.coder_pool = coder_pool
        # A format-2 code states its image size: one over this is refused (ResourceLimit)
        # before its payload is decoded, as an image over it is refused on arrival.
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        # Keyed by manifest digest: a re-exported model (new digest) gets a new runtime.
        self._codecs: dict[str, LatentCodec] = {}

    # -- models -----------------------------------------------------------------------
    def models(self) -> list[ModelEntry]:
        """Every model version in the repository, sorted by name then version."""
        return self.repository.entries()

    def runtime(self, ref: str) -> ModelRuntime:
        """The loaded, verified runtime of ``name[:version]`` (newest version by default)."""
        return self.codec(ref).runtime

    def codec(self, ref: str) -> LatentCodec:
        """The codec of ``name[:version]``, built (and its files verified) on first use."""
        return self._codec_for(self.repository.resolve(ref))

    def _codec_for(self, entry: ModelEntry) -> LatentCodec:
        key = entry.manifest.digest
        codec = self._codecs.get(key)
        if codec is not None:
            return codec
        with self._lock:  # one build per model even when many threads ask at once
            codec = self._codecs.get(key)
            if codec is None:
                verify_files(entry)
                codec = LatentCodec(ModelRuntime(entry, self.engine_config),
                                    pool=self.coder_pool)
                self._codecs[key] = codec
        return codec

    def evict(self, digest: str) -> bool:
        """Drop the cached runtime of the model version with manifest ``digest`` (it was
        removed or unloaded); calls already holding it finish with it. True if cached."""
        with self._lock:
            return self._codecs.pop(digest, None) is not None

    # -- compress / sample ------------------------------------------------------------
    def compress(self, ref: str, images: np.ndarray | Sequence[np.ndarray], *,
                 kind: str | None = None) -> list[bytes]:
        """uint8 images (N, C, H, W) -> one latent code per image, made by model ``ref``.

        ``kind``: None for the model's own code kind; ``"vq_static"`` on a vq_prior model
        gives codes that decode in one shot (no prior run per grid position), ~70% larger.
        """
        return self.compress_staged(ref, images, kind=kind)()

    def compress_staged(self, ref: str, images: np.ndarray | Sequence[np.ndarray], *,
                        kind: str | None = None) -> Callable[[], list[bytes]]:
        """``compress`` in two halves: the encoder network runs now, the coding when the
        returned function is called (``compress(...) == compress_staged(...)()``), so a
        worker can code one batch in one thread while the network runs the next in
        another (onnxruntime releases the GIL). An any-size model does it all now."""
        codec = self.codec(ref)
        if not codec.manifest.any_size:
            if not isinstance(images, np.ndarray):
                images = np.stack(images) if len(images) else np.zeros(
                    (0, *codec.manifest.image_shape), np.uint8)
            symbols, latent = codec.encode_network(images)
            return functools.partial(codec.encode, symbols, kind=kind, latent=latent)
        codes = self._compress_any(codec, images, kind)
        return lambda: codes

    def _compress_any(self, codec: LatentCodec, images: np.ndarray | Sequence[np.ndarray],
                      kind: str | None) -> list[bytes]:
        """An any-size model: images grouped by size, one encoder run and one coding per
        group, codes back in request order."""
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            if not isinstance(im, np.ndarray) or im.ndim != 3:
                raise InvalidInput(f"image {i}: expected a uint8 (C, H, W) array")
            by_size.setdefault(im.shape, []).append(i)
        out: list[bytes] = [b""] * len(images)
        for shape, idx in by_size.items():
            batch = (images[idx] if isinstance(images, np.ndarray)
                     else np.stack([images[i] for i in idx]))
            size = (int(shape[1]), int(shape[2]))
            for i, code in zip(idx, codec.compress_images(batch, kind=kind, size=size),
                               strict=True):
                out[i] = code
        return out

    def sample(self, ref: str, count: int, *, seed: int, temperature: float = 1.0,
               start: int = 0) -> np.ndarray:
        """``count`` uint8 samples; sample ``start + j`` depends only on (seed, start + j)."""
        return self.sample_staged(ref, count, seed=seed, temperature=temperature, start=start)()

    def sample_staged(self, ref: str, count: int, *, seed: int, temperature: float = 1.0,
                      start: int = 0) -> Callable[[], np.ndarray]:
        """``sample`` in two halves: the draws now, the decoder network when the returned
        function is called (``ModelRuntime.sample_staged``)."""
        check_temperature(temperature)
        return self.runtime(ref).sample_staged(count, seed=seed, temperature=temperature,
                                               start=start)

    # -- reconstruct ------------------------------------------------------------------
    def identify(self, code: bytes) -> ModelEntry:
        """The model that made ``code``; CodeError (a subclass) when it cannot be decoded here."""
        return self._identify(parse_header(code), _Entries(self.models()),
                              _LazyRegistry(self.repository.root))

    def identify_each(self, codes: Sequence[bytes]) -> list[ModelEntry | CodeError]:
        """Per code, the model here that made it, or the CodeError that names why not
        (one listing and at most one registry read for the whole batch)."""
        entries = _Entries(self.models())
        registry = _LazyRegistry(self.repository.root)
        out: list[ModelEntry | CodeError] = []
        for code in codes:
            try:
                out.append(self._identify(parse_header(code), entries, registry))
            except CodeError as exc:
                out.append(exc)
        return out

    def reconstruct(self, codes: Sequence[bytes], ref: str | None = None) -> np.ndarray:
        """Codes -> uint8 images (N, C, H, W); raises the first refusal, naming its index."""
        errors, outputs = self._reconstruct(codes, ref)
        if errors:
            i = min(errors)
            r = errors[i]
            raise with_index(r, i, len(codes)) if isinstance(r, CodeError) else r
        if not codes:
            if ref is None:
                raise InvalidInput("no codes to reconstruct (and no model named for the "
                                   "output shape)")
            return np.zeros((0, *self.codec(ref).manifest.image_shape), np.uint8)
        shapes = {images.shape[1:] for _, images in outputs}
        if len(shapes) > 1:
            raise InvalidInput(f"the codes decode to images of different shapes {sorted(shapes)}; "
                               "use reconstruct_each, or one call per model")
        if len(outputs) == 1:  # one model, every code decoded: the network's own batch
            return outputs[0][1]
        out = np.empty((len(codes), *shapes.pop()), np.uint8)
        for idx, images in outputs:
            out[idx] = images
        return out

    def reconstruct_each(self, codes: Sequence[bytes], ref: str | None = None
                         ) -> list[np.ndarray | CodeError | ResourceLimit]:
        """Per code, its uint8 image (C, H, W) or the CodeError that refused it.

        Codes are grouped by the model that made them; each group is decoded in one batch
        (one network run, the prior batched over the group's kind-3 codes). With ``ref``,
        a code made by any other model is refused with CodeMismatch.
        """
        return self.reconstruct_staged(codes, ref)()

    def reconstruct_staged(self, codes: Sequence[bytes], ref: str | None = None
                           ) -> Callable[[], list[np.ndarray | CodeError | ResourceLimit]]:
        """``reconstruct_each`` in two halves: the codes are checked and entropy-decoded
        now, the decoder network runs when the returned function is called
        (``reconstruct_each(...) == reconstruct_staged(...)()``), so a worker's network
        can run one batch while its coder decodes the next."""
        errors, pending = self._decode(codes, ref)
        return functools.partial(_results, len(codes), errors, pending)

    def _reconstruct(self, codes: Sequence[bytes], ref: str | None
                     ) -> tuple[dict[int, CodeError | ResourceLimit],
                                list[tuple[list[int], np.ndarray]]]:
        """(the refusals by index, and per decoder run the indices it decoded and its
        images, in index order)."""
        errors, pending = self._decode(codes, ref)
        return errors, _render(pending)

    def _decode(self, codes: Sequence[bytes], ref: str | None
                ) -> tuple[dict[int, CodeError | ResourceLimit], list[_Pending]]:
        """The coder half: (the refusals by index, and per decoder run to come the indices
        and their symbols)."""
        wanted = self.repository.resolve(ref) if ref is not None else None
        entries = _Entries(self.models())
        registry = _LazyRegistry(self.repository.root)
        fast = self._decode_one_head(codes, wanted, entries, registry)
        if fast is not None:
            return fast
        return self._decode_parsed(codes, range(len(codes)), wanted, entries, registry)

    def _decode_one_head(self, codes: Sequence[bytes], wanted: ModelEntry | None,
                         entries: _Entries, registry: _LazyRegistry
                         ) -> tuple[dict[int, CodeError | ResourceLimit], list[_Pending]] | None:
        """The coder pool's path for a batch it takes whose codes all start with the same
        4 bytes, naming one model here and a kind the pool codes: the headers are read and
        the checksums verified in the pool's processes, so this thread does no work per
        code. A code whose checksum does not match goes the ordinary way (which names
        why). None: the batch is not of that form."""
        pool = self.coder_pool
        if (pool is None or not pool.wants(len(codes)) or set(map(type, codes)) != {bytes}
                or min(map(len, codes)) < HEADER_SIZE):
            return None
        heads = set(map(_HEAD, codes))
        if len(heads) != 1:
            return None
        (head,) = heads
        here = entries.by_fingerprint.get(head[2:4], [])
        if len(here) != 1 or (wanted is not None
                              and wanted.manifest.digest != here[0].manifest.digest):
            return None
        codec = self._codec_for(here[0])
        if codec.pooled_kind(head) is None:
            return None
        symbols, ok, refused, unmatched = codec.decode_unparsed(codes, head)
        errors: dict[int, CodeError | ResourceLimit] = dict(refused)
        pending = [_Pending(ok, codec.runtime, symbols, None)] if ok else []
        if unmatched:
            more, later = self._decode_parsed(codes, unmatched, wanted, entries, registry)
            errors.update(more)
            pending += later
        return errors, pending

    def _decode_parsed(self, codes: Sequence[bytes], which: Iterable[int],
                       wanted: ModelEntry | None, entries: _Entries, registry: _LazyRegistry
                       ) -> tuple[dict[int, CodeError | ResourceLimit], list[_Pending]]:
        """``_decode`` of the codes at indices ``which``, each header parsed and bound to
        its model here."""
        errors: dict[int, CodeError | ResourceLimit] = {}
        groups: dict[str, tuple[ModelEntry, list[int]]] = {}
        headers: dict[int, Header] = {}
        for i in which:
            code = codes[i]
            try:
                headers[i] = header = parse_header(code)
                entry = self._identify(header, entries, registry)
                if wanted is not None and entry.manifest.digest != wanted.manifest.digest:
                    raise CodeMismatch(
                        f"this code was made by {describe(entry)}, not by the requested "
                        f"{describe(wanted)}; decode it without naming a model, or with "
                        f"{entry.manifest.ref}", model=entry.manifest.ref, index=i)
                if header.size is not None and header.size[0] * header.size[1] > self.max_pixels:
                    h, w = header.size
                    errors[i] = ResourceLimit(
                        f"code {i} is of a {w}x{h} = {w * h} pixel image; the limit is "
                        f"{self.max_pixels}", limit="max_pixels_per_image", index=i)
                    continue
                members = groups.get(entry.manifest.digest)
                if members is None:
                    members = groups[entry.manifest.digest] = (entry, [])
                members[1].append(i)
            except CodeError as exc:
                errors[i] = exc
        pending: list[_Pending] = []
        for entry, idx in groups.values():
            codec = self._codec_for(entry)
            # _identify bound each header to this model's digest: no second parse.
            mine = [headers[i] for i in idx]
            if not codec.manifest.any_size:
                symbols, ok, refused = codec.decode_stacked(mine)
                for k, refusal in refused.items():
                    errors[idx[k]] = refusal
                if ok:
                    pending.append(_Pending([idx[k] for k in ok], codec.runtime, symbols, None))
                continue
            decoded = codec.decode_headers(mine)
            by_size: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
            for i, sym in zip(idx, decoded, strict=True):
                if isinstance(sym, CodeError):
                    errors[i] = sym
                else:  # one decoder run per image size
                    by_size.setdefault(headers[i].size, []).append((i, sym))  # type: ignore[arg-type]
            for size, group in by_size.items():
                pending.append(_Pending([i for i, _ in group], codec.runtime,
                                        np.stack([sym for _, sym in group]), size))
        return errors, pending

    def _identify(self, header: Header, entries: _Entries,
                  registry: _LazyRegistry) -> ModelEntry:
        """Find the model whose full manifest digest the code's checksum matches.

        The registry (every model ever exported) is read only for codes of no model here,
        to name the model that made them.
        """
        fp = header.fingerprint
        here = entries.by_fingerprint.get(fp, [])
        for e in here:
            if header.made_by(e.manifest.digest):
                return e
        known = [m for m in registry.models()
                 if str(m.get("manifest_sha256", ""))[:4] == fp.hex()]
        for m in known:
            if header.made_by(str(m["manifest_sha256"])):
                same_name = [e.manifest.ref for e in entries.all if e.manifest.name == m["name"]]
                has = (f"the repository has {', '.join(same_name)}" if same_name
                       else f"the repository has no model named {m['name']!r}")
                raise CodeMismatch(
                    f"this code was made by {m['name']}:{m['version']} (manifest sha256 "
                    f"{str(m['manifest_sha256'])[:12]}...), which is not in "
                    f"{self.repository.root}; "
                    f"{has}. Restore that model version to decode it",
                    model=f"{m['name']}:{m['version']}")
        if here or known:
            digests = {e.manifest.digest for e in here}
            names = ", ".join([describe(e) for e in here]
                              + [f"{m['name']}:{m['version']}" for m in known
                                 if m["manifest_sha256"] not in digests])
            raise CorruptCode(
                f"checksum mismatch: the code's fingerprint {fp.hex()} names {names}, but its "
                "checksum matches none of them: the bytes were changed or truncated")
        available = ", ".join(e.manifest.ref for e in entries.all) or "none"
        raise CodeMismatch(
            f"this code was made by a model with manifest fingerprint {fp.hex()}, which neither "
            f"{self.repository.root} nor its registry knows (available: {available}); "
            "decode it where that model is installed", fingerprint=fp.hex())


# Past this a VAE's latents (normal draws times the temperature) overflow float32 near
# the top (inf, then NaN pixels), and far earlier every decoder is saturated anyway.
MAX_TEMPERATURE = 1000.0


def check_temperature(temperature: float) -> float:
    """``temperature`` as the engine uses it (``canonical_temperature``) if that is a
    number in (0, MAX_TEMPERATURE], else InvalidInput."""
    used = canonical_temperature(temperature)
    if not 0 < used <= MAX_TEMPERATURE:  # False for NaN too, and for what float32 makes 0
        raise InvalidInput(f"temperature must be a positive number, got {temperature} (at "
                           f"most {MAX_TEMPERATURE:g}: higher ones only saturate the decoder; "
                           "at least float32's smallest, 1.4e-45)")
    return used


# A code's bytes 0..3 (format, kind, fingerprint), read in C over a whole batch.
_HEAD = operator.itemgetter(slice(0, 4))


class _Pending(NamedTuple):
    """One decoder run still to do: which codes, whose network, their symbols, the image
    size (any-size models; None for fixed-size ones)."""

    idx: list[int]
    runtime: ModelRuntime
    symbols: np.ndarray
    size: tuple[int, int] | None


def _render(pending: list[_Pending]) -> list[tuple[list[int], np.ndarray]]:
    """The decoder network half of reconstructing: one run per pending group."""
    return [(p.idx, p.runtime.decode(p.symbols) if p.size is None
             else p.runtime.decode(p.symbols, p.size)) for p in pending]


def _results(count: int, errors: dict[int, CodeError | ResourceLimit],
             pending: list[_Pending]) -> list[np.ndarray | CodeError | ResourceLimit]:
    """Per code, its image or its refusal, after the decoder runs."""
    results: list[np.ndarray | CodeError | ResourceLimit] = [CorruptCode("not decoded")] * count
    for i, exc in errors.items():
        results[i] = exc
    for idx, images in _render(pending):
        for i, image in zip(idx, images, strict=True):
            results[i] = image
    return results


def describe(entry: ModelEntry) -> str:
    """``name:version (manifest sha256 abcdef012345...)``."""
    return f"{entry.manifest.ref} (manifest sha256 {entry.manifest.digest[:12]}...)"


class _Entries:
    """One listing of the repository, indexed by fingerprint once per call."""

    def __init__(self, entries: list[ModelEntry]) -> None:
        self.all = entries
        self.by_fingerprint: dict[bytes, list[ModelEntry]] = {}
        for e in entries:
            self.by_fingerprint.setdefault(e.manifest.fingerprint, []).append(e)


class _LazyRegistry:
    """``registry.json`` read at most once, and only when a code needs it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._models: list[dict[str, object]] | None = None

    def models(self) -> list[dict[str, object]]:
        if self._models is None:
            self._models = read_registry(self.root)
        return self._models
