"""The onnxruntime engine: a loaded model's sessions and the tensor-level operations.

``ModelRuntime`` turns uint8 images into integer symbols (``encode``), symbols back
into uint8 images (``decode``), evaluates the VQ prior (``prior_logits``: one full pass;
``prior_stepper``: position by position with caches) and draws samples (``sample``).
It knows nothing of bytes on the wire: that is ``codec``.

A process that runs models keeps its memory flat (``process_memory``): every session
draws from one shared onnxruntime CPU arena, glibc keeps one malloc arena instead of up
to eight per core (operators may set MALLOC_ARENA_MAX themselves), and free C heap goes
back to the OS once the models have been idle for a moment (bench/memory.py measures it).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnxruntime as ort

from latentserve.errors import (
    InvalidInput,
    ModelIntegrityError,
    ProviderUnavailable,
    UnsupportedOperation,
)
from latentserve.worker.codec.intnet import IntNet, load_intnet, table_indices
from latentserve.worker.runtime.manifest import Manifest
from latentserve.worker.runtime.repository import ModelEntry
from latentserve.worker.runtime.settings import PROVIDERS, Provider


@dataclass(frozen=True)
class EngineConfig:
    """How onnxruntime sessions are built. One per process, passed down."""

    provider: Provider = "cpu"
    # Threads per session; 0 = onnxruntime's default (all cores). The service sets this
    # so that sessions x threads does not oversubscribe the cores next to gRPC's pool.
    intra_op_threads: int = 0
    device_id: int = 0
    # Largest batch handed to one session.run; bigger inputs are cut into pieces.
    max_batch: int = 1024
    cuda_mem_limit_bytes: int = 0  # 0 = no arena limit
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    trt_fp16: bool = False
    trt_cache_dir: str = ""
    # IO binding: inputs copied to the device once as OrtValues and outputs allocated
    # there by onnxruntime, instead of numpy in/out through the session's own staging.
    # "auto" = on for a GPU provider (measured there: ~1.6x the images/s of numpy in/out
    # on a small conv autoencoder), off on the CPU, where it only adds a copy.
    io_binding: Literal["auto", "on", "off"] = "auto"

    # Any-size models (docs/code-format.md, "Any size"): an image whose padded size is at
    # most ``untiled_pixels`` runs whole (several such images per run, up to that many
    # pixels); a bigger one runs in tiles of ``tile_cells`` x ``tile_cells`` latent cells,
    # each computed with ``tile_margin`` cells of context on every side that is then
    # dropped, so memory is bounded by the tile, not the image.
    untiled_pixels: int = 1 << 20
    tile_cells: int = 48
    tile_margin: int = 4

    def __post_init__(self) -> None:
        if self.tile_cells < 1 or self.tile_margin < 0 or self.untiled_pixels < 1:
            raise InvalidInput("tile_cells and untiled_pixels must be >= 1, tile_margin >= 0")
        if self.provider not in PROVIDERS:
            raise InvalidInput(f"provider {self.provider!r} is not one of {PROVIDERS}")
        if self.io_binding not in ("auto", "on", "off"):
            raise InvalidInput(f"io_binding {self.io_binding!r} is not one of auto, on, off")
        if self.max_batch < 1:
            raise InvalidInput(f"max_batch must be >= 1, got {self.max_batch}")


def execution_providers(config: EngineConfig) -> list[str | tuple[str, dict[str, object]]]:
    """The provider list for a session; raises ProviderUnavailable unless ``auto``."""
    available = ort.get_available_providers()
    cuda_opts: dict[str, object] = {
        "device_id": config.device_id,
        "cudnn_conv_algo_search": config.cudnn_conv_algo_search,
        # TF32 changes conv results in the 3rd decimal: the prior's integer tables
        # must match the CPU's, so keep full fp32.
        "use_tf32": 0,
    }
    if config.cuda_mem_limit_bytes:
        cuda_opts["gpu_mem_limit"] = config.cuda_mem_limit_bytes
    cuda = ("CUDAExecutionProvider", cuda_opts)
    if config.provider == "cpu":
        return ["CPUExecutionProvider"]
    if config.provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ProviderUnavailable(
                "provider 'cuda' requested but onnxruntime offers only "
                f"{available}; install onnxruntime-gpu with a matching CUDA, "
                "or use --provider cpu (or auto to fall back)")
        return [cuda, "CPUExecutionProvider"]
    if config.provider == "tensorrt":
        if "TensorrtExecutionProvider" not in available:
            raise ProviderUnavailable(
                f"provider 'tensorrt' requested but onnxruntime offers only {available}")
        trt_opts: dict[str, object] = {"device_id": config.device_id,
                                       "trt_fp16_enable": config.trt_fp16}
        if config.trt_cache_dir:
            trt_opts.update(trt_engine_cache_enable=True,
                            trt_engine_cache_path=config.trt_cache_dir)
        return [("TensorrtExecutionProvider", trt_opts), cuda, "CPUExecutionProvider"]
    # auto: the best available, CPU last.
    chain: list[str | tuple[str, dict[str, object]]] = []
    if "CUDAExecutionProvider" in available:
        chain.append(cuda)
    chain.append("CPUExecutionProvider")
    return chain


def make_session(path: str | os.PathLike[str], config: EngineConfig) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if process_memory().shared_arena:
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), sess_options=opts,
                                providers=execution_providers(config))


# -- process memory ---------------------------------------------------------------------
# Measured with bench/memory.py (10,000 mixed requests on the shipped zoo, 2 cores): with
# onnxruntime's and glibc's defaults a server's RSS grew from 252 to 419 MiB and kept
# growing while its live objects did not. Each session's own arena grew to the largest
# batch it had run (20 sessions on the zoo), and each of glibc's malloc arenas (up to 8
# per core) kept its own fragmented free memory. One shared arena shrunk after each run,
# one malloc arena (malloc_trim cannot release the top of another arena's heap: with 2
# the run still grew 32%) and a trim once idle keep it at 130 -> 134 MiB.
MALLOC_ARENA_MAX = 1    # glibc arenas unless MALLOC_ARENA_MAX / GLIBC_TUNABLES say otherwise
TRIM_IDLE_S = 1.0       # free C heap goes back to the OS after this long with no model run
TRIM_EVERY_S = 30.0     # ... and at least this often while runs never pause
_M_ARENA_MAX = -8       # mallopt parameter number (glibc malloc.h)
log = logging.getLogger(__name__)


class ProcessMemory:
    """The process-wide allocator settings of a process that runs models (one instance).

    - ``shared_arena``: one onnxruntime CPU arena, registered with the environment and
      extended by what is asked (not doubled), that every session uses; ``run_options``
      (pass them to every run) shrink it back to its first chunk after each run, so a
      large batch's memory returns to the heap instead of staying with one session.
    - glibc: at most ``MALLOC_ARENA_MAX`` malloc arenas, and a daemon thread that calls
      ``malloc_trim(0)`` once no session has run for ``TRIM_IDLE_S`` (or every
      ``TRIM_EVERY_S`` under constant load): freed pages leave the RSS instead of
      waiting, fragmented, in an arena. Without glibc both are skipped.
    """

    def __init__(self) -> None:
        self.runs = 0  # session runs so far (a change means "not idle"; races are harmless)
        self.trims = 0
        self.shared_arena = self._register_shared_arena()
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._libc = _glibc()
        if self._libc is not None:
            tunables = os.environ.get("GLIBC_TUNABLES", "")
            if "MALLOC_ARENA_MAX" not in os.environ and "arena_max" not in tunables:
                self._libc.mallopt(_M_ARENA_MAX, MALLOC_ARENA_MAX)
            threading.Thread(target=self._trim_loop, name="latentserve-heap-trim",
                             daemon=True).start()

    @staticmethod
    def _register_shared_arena() -> bool:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(
                {"arena_extend_strategy": 1}))  # 1 = kSameAsRequested
            return True
        except Exception as exc:  # noqa: BLE001 - per-session arenas still work
            log.warning("no shared onnxruntime CPU arena (%s): each session keeps its own", exc)
            return False

    def trim(self) -> None:
        """Hand free C heap pages back to the OS now (glibc ``malloc_trim``)."""
        if self._libc is not None:
            self._libc.malloc_trim(0)
            self.trims += 1

    def _trim_loop(self) -> None:
        trimmed_at, seen = self.runs, self.runs
        last = time.monotonic()
        while True:
            time.sleep(TRIM_IDLE_S)
            runs = self.runs
            idle = runs == seen
            seen = runs
            if runs != trimmed_at and (idle or time.monotonic() - last >= TRIM_EVERY_S):
                self.trim()
                trimmed_at, last = runs, time.monotonic()


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


_process_memory: ProcessMemory | None = None
_process_memory_lock = threading.Lock()


def unsupported(manifest: Manifest, operation: str) -> UnsupportedOperation:
    """The refusal of an operation the model cannot do, naming what it can."""
    why = " (it has no generative prior: a photo codec)" if operation == "sample" else ""
    return UnsupportedOperation(
        f"model {manifest.ref} cannot {operation}{why}; it supports "
        f"{', '.join(manifest.operations)}", model=manifest.ref, operation=operation,
        supported=",".join(manifest.operations))


def process_memory() -> ProcessMemory:
    """This process's ``ProcessMemory``, set up on first use: by the server's catalog or
    ``create_worker`` before they start threads, else by the first session."""
    global _process_memory
    with _process_memory_lock:
        if _process_memory is None:
            _process_memory = ProcessMemory()
        return _process_memory


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of the ``index``-th sample of a seed: independent of batching."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


def canonical_temperature(temperature: float) -> float:
    """The temperature a sample is drawn with: the nearest float32.

    The wire (``SampleRequest.temperature``, ``JobSpec.temperature``) carries a float32,
    so a server sees 0.800000011920929 where a caller in process passed 0.8; scaling
    float64 normals by the two differs in the last bit and can move a pixel by a grey
    level. Every path rounds here, so one (seed, temperature, index) is one image.
    """
    with np.errstate(over="ignore"):  # past float32's range: inf, refused by the callers
        return float(np.float32(temperature))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Decoder output in [0, 1] (float) to uint8 pixels."""
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


class ModelRuntime:
    """A verified model's onnxruntime sessions and its tensor-level operations."""

    def __init__(self, entry: ModelEntry, config: EngineConfig | None = None) -> None:
        self.entry = entry
        self.manifest = entry.manifest
        self.config = config or EngineConfig()
        self.memory = process_memory()
        self.encoder = make_session(entry.file("encoder"), self.config)
        self.decoder = make_session(entry.file("decoder"), self.config)
        self.prior = (make_session(entry.file("prior"), self.config)
                      if "prior" in self.manifest.files else None)
        # Optional (models exported before it existed lack it): the prior one position
        # at a time, ~1 full pass per grid instead of h*w.
        self.prior_step = (make_session(entry.file("prior_step"), self.config)
                           if "prior_step" in self.manifest.files else None)
        # Code kind hyperprior: y_hat -> z, and z_hat -> the scales of y's tables.
        hyper = self.manifest.hyperprior is not None
        self.hyper_encoder: ort.InferenceSession | None = (
            make_session(entry.file("hyper_encoder"), self.config) if hyper else None)
        files = self.manifest.files
        self.hyper_decoder: ort.InferenceSession | None = (
            make_session(entry.file("hyper_decoder"), self.config)
            if hyper and "hyper_decoder" in files else None)
        # Or an integer hyper-decoder, computed exactly (worker/codec/intnet.py).
        self.hyper_int: tuple[IntNet, np.ndarray] | None = (
            load_intnet(entry.file("hyper_decoder_int"))
            if hyper and "hyper_decoder_int" in files else None)
        if self.hyper_int is not None:
            self._check_hyper_int(*self.hyper_int)
        # A vae's learned sampling prior (sampling kind "learned"): noise -> latent.
        self.sampler = (make_session(entry.file("sampler"), self.config)
                        if "sampler" in self.manifest.files else None)
        self._support: tuple[np.ndarray, np.ndarray] | None = None  # see quantize
        self.provider: str = self.encoder.get_providers()[0]
        on_gpu = self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        binding = self.config.io_binding
        # The device IO binding places tensors on; None = plain numpy session.run.
        self.io_device: str | None = (
            ("cuda" if on_gpu else "cpu") if binding == "on" or (binding == "auto" and on_gpu)
            else None)

    # -- shapes ---------------------------------------------------------------------
    def check_images(self, images: np.ndarray) -> np.ndarray:
        """Validate a uint8 (N, C, H, W) batch against the model's image shape."""
        want = self.manifest.image_shape
        if self.manifest.any_size:
            if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != want[0]
                    or min(images.shape[2:]) < 1):
                raise InvalidInput(
                    f"model {self.manifest.ref} takes uint8 images of shape (N, {want[0]}, "
                    f"H, W), any H, W >= 1; got {images.dtype} {tuple(images.shape)}")
            return np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise InvalidInput(
                f"model {self.manifest.ref} takes uint8 images of shape (N, {want[0]}, "
                f"{want[1]}, {want[2]}); got {images.dtype} {tuple(images.shape)}")
        return np.ascontiguousarray(images)

    def check_symbols(self, symbols: np.ndarray,
                      size: tuple[int, int] | None = None) -> np.ndarray:
        """Validate symbols (N, *latent shape); an any-size model's are (N, M, h, w), for
        images of ``size`` when given (any h, w >= 1 otherwise)."""
        m = self.manifest
        if m.any_size and size is None:
            ok = symbols.ndim == 4 and symbols.shape[1] == m.latent_shape[0] \
                and min(symbols.shape[2:]) >= 1
            if not ok:
                raise InvalidInput(f"model {m.ref} takes symbols of shape (N, "
                                   f"{m.latent_shape[0]}, h, w); got {tuple(symbols.shape)}")
            return symbols
        want = m.latent_shape_for(*size) if size is not None else m.latent_shape
        if symbols.ndim != len(want) + 1 or tuple(symbols.shape[1:]) != want:
            raise InvalidInput(f"model {m.ref} takes symbols of shape (N, "
                               f"{', '.join(map(str, want))}); got {tuple(symbols.shape)}")
        return symbols

    def _run(self, session: ort.InferenceSession, name: str, x: np.ndarray) -> np.ndarray:
        """One input, first output, through IO binding when ``io_device`` is set."""
        self.memory.runs += 1
        out: np.ndarray
        if self.io_device is None:
            out = session.run(None, {name: x}, self.memory.run_options)[0]
            return out
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(x), self.io_device, self.config.device_id))
        binding.bind_output(session.get_outputs()[0].name, self.io_device, self.config.device_id)
        session.run_with_iobinding(binding, self.memory.run_options)
        out = binding.copy_outputs_to_cpu()[0]
        return out

    def _batched(self, fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        step = self.config.max_batch
        if len(x) <= step:
            return fn(x)
        return np.concatenate([fn(x[i:i + step]) for i in range(0, len(x), step)])

    # -- encode / decode --------------------------------------------------------------
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, C, H, W) -> int32 symbols (N, *latent_shape)."""
        if self.manifest.family == "vqvae":
            images = self.check_images(images)
            if len(images) == 0:
                return np.zeros((0, *self.manifest.latent_shape), np.int32)
            out = self._batched(lambda b: self._run(self.encoder, "image", b), images)
            return out.astype(np.int32)
        return self.quantize(self.encode_latent(images))

    def encode_latent(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, C, H, W) -> the encoder's float32 latents, before rounding
        (ae / vae; a hyperprior's hyper-encoder reads them, as in training)."""
        images = self.check_images(images)
        if self.manifest.any_size:
            return self._encode_any(images)
        if len(images) == 0:
            return np.zeros((0, *self.manifest.latent_shape), np.float32)
        return self._batched(lambda b: self._run(self.encoder, "image", b), images)

    def quantize(self, latent: np.ndarray) -> np.ndarray:
        """Continuous latents -> symbols on the factorized tables' support."""
        spec = self.manifest.factorized
        assert spec is not None
        bounds = self._support
        if bounds is None:  # the tables' support, per channel: built once
            lo = np.array(spec.offsets, np.float64).reshape(1, -1, 1, 1)
            hi = lo + np.array([len(f) for f in spec.freqs], np.float64).reshape(1, -1, 1, 1) - 1
            bounds = self._support = (lo, hi)
        sym = np.rint(latent.astype(np.float64) / spec.step)
        # np.clip's result (NaN stays NaN), without its Python-level wrapper.
        np.maximum(sym, bounds[0], out=sym)
        np.minimum(sym, bounds[1], out=sym)
        return sym.astype(np.int32)

    def decode(self, symbols: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """int symbols (N, *latent_shape) -> uint8 images (N, C, H, W).

        An any-size model's images come back cropped to ``size`` (H, W), by default the
        padded size its symbols stand for."""
        symbols = self.check_symbols(symbols)
        if self.manifest.any_size:
            spec = self.manifest.factorized
            assert spec is not None
            s = self.manifest.stride
            h, w = size or (symbols.shape[2] * s, symbols.shape[3] * s)
            if self.manifest.latent_shape_for(h, w) != tuple(symbols.shape[1:]):
                raise InvalidInput(f"model {self.manifest.ref}: symbols of shape "
                                   f"{tuple(symbols.shape[1:])} are not those of a {h}x{w} image")
            return self._decode_any(symbols, spec.step, h, w)
        if len(symbols) == 0:
            return np.zeros((0, *self.manifest.image_shape), np.uint8)
        feed: np.ndarray
        if self.manifest.family == "vqvae":
            feed = symbols.astype(np.int64)
            name = "indices"
        else:
            spec = self.manifest.factorized
            assert spec is not None
            feed = (symbols.astype(np.float32) * np.float32(spec.step))
            name = "latent"
        out = self._batched(lambda b: self._run(self.decoder, name, b), feed)
        return to_uint8(out)

    # -- any size: padding, whole runs and tiles ---------------------------------------
    def _group_size(self, pixels: int) -> int:
        """How many images of ``pixels`` (padded) one untiled run takes."""
        return max(1, min(self.config.max_batch, self.config.untiled_pixels // max(1, pixels)))

    def _spans(self, cells: int) -> list[tuple[int, int, int, int]]:
        """Tiles along one axis of ``cells`` latent cells: (core start, core end, context
        start, context end); one span covering everything when it fits."""
        t, m = self.config.tile_cells, self.config.tile_margin
        return [(a, min(a + t, cells), max(0, a - m), min(cells, a + t + m))
                for a in range(0, cells, t)]

    def _encode_any(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> float32 latents (N, M, ceil(H/s), ceil(W/s)): padded with
        the edge pixels to multiples of s, run whole or in tiles."""
        m = self.manifest
        n, _, h, w = images.shape
        ph, pw = m.padded_size(h, w)
        s = m.stride
        lh, lw = ph // s, pw // s
        out = np.empty((n, m.latent_shape[0], lh, lw), np.float32)
        tiled = ph * pw > self.config.untiled_pixels
        step = 1 if tiled else self._group_size(ph * pw)
        for a in range(0, n, step):
            batch = images[a:a + step]
            padded = (np.pad(batch, ((0, 0), (0, 0), (0, ph - h), (0, pw - w)), mode="edge")
                      if (ph, pw) != (h, w) else batch)
            if not tiled:
                out[a:a + step] = self._run(self.encoder, "image", np.ascontiguousarray(padded))
                continue
            for r0, r1, y0, y1 in self._spans(lh):
                for c0, c1, x0, x1 in self._spans(lw):
                    crop = np.ascontiguousarray(padded[:, :, y0 * s:y1 * s, x0 * s:x1 * s])
                    lat = self._run(self.encoder, "image", crop)
                    out[a:a + 1, :, r0:r1, c0:c1] = lat[:, :, r0 - y0:r1 - y0, c0 - x0:c1 - x0]
        return out

    def _decode_any(self, symbols: np.ndarray, step: float, h: int, w: int) -> np.ndarray:
        """Symbols (N, M, lh, lw) -> uint8 (N, C, h, w): decoded whole or in tiles (with
        context), cropped to the image."""
        m = self.manifest
        s = m.stride
        n, _, lh, lw = symbols.shape
        out = np.empty((n, m.channels, h, w), np.uint8)
        tiled = lh * lw * s * s > self.config.untiled_pixels
        group = 1 if tiled else self._group_size(lh * lw * s * s)
        for a in range(0, n, group):
            latent = symbols[a:a + group].astype(np.float32) * np.float32(step)
            if not tiled:
                out[a:a + group] = to_uint8(self._run(self.decoder, "latent", latent)[:, :, :h, :w])
                continue
            for r0, r1, y0, y1 in self._spans(lh):
                if r0 * s >= h:
                    continue
                for c0, c1, x0, x1 in self._spans(lw):
                    if c0 * s >= w:
                        continue
                    img = self._run(self.decoder, "latent",
                                    np.ascontiguousarray(latent[:, :, y0:y1, x0:x1]))
                    ya, yb = r0 * s, min(r1 * s, h)
                    xa, xb = c0 * s, min(c1 * s, w)
                    out[a:a + 1, :, ya:yb, xa:xb] = to_uint8(
                        img[:, :, ya - y0 * s:yb - y0 * s, xa - x0 * s:xb - x0 * s])
        return out

    def hyper_latent(self, symbols: np.ndarray) -> np.ndarray:
        """Latent symbols, or float latents (``z.input`` "latent"), (N, C, h, w) -> the
        hyper-encoder's float32 z (N, Cz, hz, wz); an any-size model's input is
        zero-padded to multiples of z's stride first."""
        if self.hyper_encoder is None:
            raise InvalidInput(f"model {self.manifest.ref} has no hyperprior")
        session = self.hyper_encoder
        feed = symbols.astype(np.float32)  # step 1: y_hat is the symbols (or y itself)
        spec = self.manifest.hyperprior
        assert spec is not None
        if spec.z_stride:
            _, hz, wz = spec.z_shape_for(symbols.shape[2:])
            s = spec.z_stride
            feed = np.pad(feed, ((0, 0), (0, 0), (0, hz * s - feed.shape[2]),
                                 (0, wz * s - feed.shape[3])))
        return self._batched(lambda b: self._run(session, "latent", b), feed)

    @property
    def hyper_exact(self) -> bool:
        """Whether the hyper-decoder is an integer network (exact table indices)."""
        return self.hyper_int is not None

    def hyper_indices(self, z: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
        """z symbols (N, Cz, hz, wz) -> the integer hyper-decoder's table index of every
        element of y (N, C, h, w), cropped to y's grid ``latent_hw``; the same integers on
        every machine."""
        if self.hyper_int is None:
            raise InvalidInput(f"model {self.manifest.ref} has no integer hyper-decoder")
        net, thresholds = self.hyper_int
        t = net(z)
        h, w = latent_hw
        c = self.manifest.latent_shape[0]
        if t.shape[1] != c or t.shape[2] < h or t.shape[3] < w:
            raise ModelIntegrityError(f"{self.manifest.ref}: hyper_decoder_int gives "
                                      f"{tuple(t.shape[1:])} for z {tuple(z.shape[1:])}; y "
                                      f"is ({c}, {h}, {w})")
        return table_indices(t[:, :, :h, :w], thresholds)

    def _check_hyper_int(self, net: IntNet, thresholds: np.ndarray) -> None:
        """Load-time: the network takes every z the tables can give, and has one
        threshold per table boundary."""
        spec = self.manifest.hyperprior
        assert spec is not None
        top = max(max(abs(o), abs(o + len(f) - 1))
                  for o, f in zip(spec.z_offsets, spec.z_freqs, strict=True))
        if top > net.input_bound or len(thresholds) != spec.levels - 1:
            raise ModelIntegrityError(
                f"{self.manifest.ref}: hyper_decoder_int takes |z| <= {net.input_bound} "
                f"with {len(thresholds)} thresholds; the tables give |z| up to {top} and "
                f"need {spec.levels - 1}")

    def hyper_scales(self, z: np.ndarray) -> np.ndarray:
        """z symbols (N, Cz, hz, wz) -> the hyper-decoder's scales (N, C, h, w), float32."""
        if self.hyper_decoder is None:
            raise InvalidInput(f"model {self.manifest.ref} has no hyperprior")
        session = self.hyper_decoder
        feed = z.astype(np.float32)
        out = self._batched(lambda b: self._run(session, "hyper_latent", b), feed)
        want = (len(z), *self.manifest.latent_shape)
        if tuple(out.shape) != want:
            raise ModelIntegrityError(f"{self.manifest.ref}: hyper_decoder gives scales of "
                                      f"shape {tuple(out.shape)}, expected {want}")
        return out

    def prior_logits(self, indices: np.ndarray) -> np.ndarray:
        """VQ index grids (N, h, w) -> float32 logits (N, K, h, w) of the causal prior."""
        if self.prior is None:
            raise InvalidInput(f"model {self.manifest.ref} ({self.manifest.family}) has no prior")
        feed = indices.astype(np.int64)
        return self._batched(lambda b: self._run(self.prior, "indices", b), feed)

    def group_logits(self, indices: np.ndarray, group: int) -> np.ndarray:
        """A vq_parallel model's prior: float32 logits (N, m, K) at the m positions of
        schedule group ``group`` (in schedule order), given ``indices`` (N, h, w); only the
        positions of earlier groups are read (the graph masks the others)."""
        spec = self.manifest.vq_parallel
        if self.prior is None or spec is None:
            raise InvalidInput(f"model {self.manifest.ref} has no parallel prior")
        if not 0 <= group < len(spec.schedule):
            raise InvalidInput(f"{self.manifest.ref}: schedule group {group} is not in "
                               f"0..{len(spec.schedule) - 1}")
        session, size = self.prior, len(spec.schedule[group])
        g = np.array(group, np.int64)

        def run(batch: np.ndarray) -> np.ndarray:
            self.memory.runs += 1
            out: np.ndarray = session.run(None, {"indices": batch, "group": g},
                                          self.memory.run_options)[0]
            return out[:, :size]

        return np.ascontiguousarray(self._batched(run, np.ascontiguousarray(indices, np.int64)))

    def parallel_logits(self, indices: np.ndarray) -> np.ndarray:
        """Teacher forcing of a vq_parallel prior: float32 logits (N, h*w, K) in raster
        order, each position's from its own group's pass (what a decoder computes)."""
        spec = self.manifest.vq_parallel
        assert spec is not None
        out: np.ndarray | None = None
        for g, members in enumerate(spec.schedule):
            logits = self.group_logits(indices, g)
            if out is None:
                out = np.zeros((len(indices), self.manifest.num_symbols, logits.shape[2]),
                               np.float32)
            out[:, list(members)] = logits
        assert out is not None
        return out

    def prior_stepper(self, n: int) -> PriorStepper:
        """A fresh raster-order evaluator of the prior for a batch of ``n`` grids."""
        return PriorStepper(self, n)

    # -- sampling ---------------------------------------------------------------------
    def sample(self, count: int, *, seed: int, temperature: float = 1.0,
               start: int = 0) -> np.ndarray:
        """Draw ``count`` uint8 images; sample ``start + j`` depends only on (seed, start + j)."""
        return self.sample_staged(count, seed=seed, temperature=temperature, start=start)()

    def sample_staged(self, count: int, *, seed: int, temperature: float = 1.0,
                      start: int = 0) -> Callable[[], np.ndarray]:
        """``sample`` in two halves: the draws (and a sampler or prior network) now, the
        decoder network when the returned function is called, so a worker can draw one
        batch while the decoder runs the previous one."""
        if "sample" not in self.manifest.operations:
            raise unsupported(self.manifest, "sample")
        if count < 0:
            raise InvalidInput(f"sample count must be >= 0, got {count}")
        used = canonical_temperature(temperature)
        if not (used > 0 and np.isfinite(used)):
            raise InvalidInput(f"temperature must be a positive number, got {temperature}")
        temperature = used
        rngs = [image_rng(seed, start + j) for j in range(count)]
        if count == 0:
            empty = np.zeros((0, *self.manifest.image_shape), np.uint8)
            return lambda: empty
        family = self.manifest.family
        if family == "vqvae":
            return functools.partial(self.decode, self._sample_indices(rngs, temperature))
        if family == "vae":
            return functools.partial(self._decode_latent, self._vae_latents(rngs, temperature))
        if self.sampler is not None:  # ae, sampling kind "learned"
            # The sampler gives the continuous latent; rounded as the encoder's output is.
            return functools.partial(self.decode,
                                     self.quantize(self._learned_latents(rngs, temperature)))
        dim = self.manifest.num_symbols
        normal = np.stack([r.standard_normal(dim) for r in rngs])
        # ae: a diagonal Gaussian mixture fitted to the training latents.
        gmm = self.manifest.sampling
        weights = np.asarray(gmm["weights"], np.float64)
        means = np.asarray(gmm["means"], np.float64)
        stds = np.asarray(gmm["stds"], np.float64)
        cdf = np.cumsum(weights / weights.sum())
        comp = np.array([min(int(np.searchsorted(cdf, r.random(), side="right")), len(cdf) - 1)
                         for r in rngs])
        latent = means[comp] + stds[comp] * normal * temperature
        return functools.partial(
            self.decode, self.quantize(latent.reshape(count, *self.manifest.latent_shape)))

    def sample_latents(self, count: int, *, seed: int, temperature: float = 1.0,
                       start: int = 0) -> np.ndarray:
        """A vae's sampled latents (N, C, h, w) float32, before the decoder (what
        ``sample`` decodes): N(0, I), or the learned sampler's output."""
        if self.manifest.family != "vae":
            raise InvalidInput(f"model {self.manifest.ref} ({self.manifest.family}) has no "
                               "continuous sampling latent")
        used = canonical_temperature(temperature)
        if not (used > 0 and np.isfinite(used)):
            raise InvalidInput(f"temperature must be a positive number, got {temperature}")
        rngs = [image_rng(seed, start + j) for j in range(count)]
        return self._vae_latents(rngs, used)

    def _vae_latents(self, rngs: list[np.random.Generator], temperature: float) -> np.ndarray:
        shape = self.manifest.latent_shape
        if self.sampler is None:  # sampling kind "gaussian": the latent is N(0, I)
            normal = np.stack([r.standard_normal(self.manifest.num_symbols) for r in rngs])
            return (normal * temperature).reshape(len(rngs), *shape).astype(np.float32)
        return self._learned_latents(rngs, temperature)

    def _learned_latents(self, rngs: list[np.random.Generator],
                         temperature: float) -> np.ndarray:
        """Sampling kind "learned" (vae or ae): u ~ N(0, I) of noise_dim numbers, scaled
        by the temperature (the float64 product, as above, so one (seed, temperature,
        index) is one latent), through the sampler: (N, C, h, w) float32."""
        noise = np.stack([r.standard_normal(self.manifest.noise_dim) for r in rngs])
        u = (noise * temperature).astype(np.float32)
        sampler = self.sampler
        assert sampler is not None
        latent = self._batched(lambda b: self._run(sampler, "noise", b), u)
        return latent.reshape(len(rngs), *self.manifest.latent_shape)

    def _decode_latent(self, latent: np.ndarray) -> np.ndarray:
        """A vae's sampled latents through its decoder (no quantization)."""
        return to_uint8(self._batched(lambda b: self._run(self.decoder, "latent", b), latent))

    def _sample_indices(self, rngs: list[np.random.Generator], temperature: float) -> np.ndarray:
        """Ancestral sampling in the prior's decoding order: raster (vq_prior), or group
        by group (vq_parallel). Position p draws with the p-th uniform of its image's
        stream either way."""
        h, w = self.manifest.latent_shape
        n = len(rngs)
        uniforms = np.stack([r.random(h * w) for r in rngs])
        grid = np.zeros((n, h, w), np.int64)
        flat = grid.reshape(n, h * w)
        spec = self.manifest.vq_parallel
        if self.manifest.code_kind == "vq_parallel" and spec is not None:
            for g, members in enumerate(spec.schedule):
                cols = list(members)
                flat[:, cols] = draw(self.group_logits(grid, g), uniforms[:, cols], temperature)
            return grid
        stepper = self.prior_stepper(n)
        for pos in range(h * w):
            logits = stepper.logits(pos, grid)[:, None]
            flat[:, pos] = draw(logits, uniforms[:, pos:pos + 1], temperature)[:, 0]
        return grid


def draw(logits: np.ndarray, uniforms: np.ndarray, temperature: float) -> np.ndarray:
    """Categorical draws by inverse CDF: logits (n, m, K), uniforms (n, m) -> (n, m) int64
    under softmax(logits / temperature) in float64."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    cdf = np.cumsum(np.exp(z), axis=-1)
    cdf /= cdf[..., -1:]
    out: np.ndarray = np.minimum((cdf < uniforms[..., None]).sum(axis=-1), z.shape[-1] - 1)
    return out.astype(np.int64)


class PriorStepper:
    """The VQ prior's logits position by position in raster order, for ``n`` grids.

    With the model's ``prior_step`` graph, each call runs one step that reads per-layer
    caches of the earlier positions (kept here, updated in place) and costs ~1/(h*w) of a
    full pass; without it (older models) each call runs the full prior, as before. Either
    way the logits at p depend only on ``indices`` at positions < p, so a teacher-forced
    encoder (``all_logits``) and a decoder that fills the grid as it goes see the same
    inputs. ``runtime`` is anything with ``prior_logits``, ``prior_step``, ``config`` and
    ``manifest`` (a ``ModelRuntime``, or a test's wrapper around one).
    """

    def __init__(self, runtime: ModelRuntime, n: int) -> None:
        if runtime.prior is None:
            raise InvalidInput(f"model {runtime.manifest.ref} ({runtime.manifest.family}) "
                               "has no prior")
        self.runtime = runtime
        self.n = n
        self.grid = tuple(runtime.manifest.latent_shape)
        self.session = runtime.prior_step
        self.memory = process_memory()
        # onnxruntime's own session takes the run options (the shared arena shrinks after
        # each step); a wrapper around it (a test's, bench/codec.py's) takes names and feed.
        self._run_options = ((self.memory.run_options,)
                             if isinstance(self.session, ort.InferenceSession) else ())
        self.next = 0
        self.caches: list[np.ndarray] = []
        if self.session is not None:
            h, w = self.grid
            # Row h*w stays zero: the step graph reads it for taps outside the grid.
            self.caches = [np.zeros((n, h * w + 1, int(i.shape[2])), np.float32)
                           for i in self.session.get_inputs()[2:]]

    @property
    def stepwise(self) -> bool:
        """Whether this model has a step graph (else every call is a full pass)."""
        return self.session is not None

    def logits(self, position: int, indices: np.ndarray) -> np.ndarray:
        """float32 logits (n, K) at ``position`` given ``indices`` (n, h, w) before it.

        Positions must come in raster order, each once, starting at 0.
        """
        h, w = self.grid
        if position != self.next or position >= h * w:
            raise InvalidInput(f"prior steps go in raster order: expected position "
                               f"{self.next} of {h * w}, got {position}")
        if indices.shape != (self.n, h, w):
            raise InvalidInput(f"prior stepper for {self.n} grids of {h}x{w} got indices "
                               f"of shape {tuple(indices.shape)}")
        self.next += 1
        if self.session is None:
            y, x = divmod(position, w)
            return np.ascontiguousarray(self.runtime.prior_logits(indices)[:, :, y, x])
        feed_idx = np.ascontiguousarray(indices, np.int64)
        pos = np.array(position, np.int64)
        step = self.runtime.config.max_batch
        out = [np.zeros((0, int(self.session.get_outputs()[0].shape[1])), np.float32)]
        for a in range(0, self.n, step):
            b = min(a + step, self.n)
            feed = {"indices": feed_idx[a:b], "position": pos}
            feed.update({f"cache{i}": c[a:b] for i, c in enumerate(self.caches)})
            self.memory.runs += 1
            logits, *feats = self.session.run(None, feed, *self._run_options)
            for c, f in zip(self.caches, feats, strict=True):
                c[a:b, position] = f
            out.append(logits)
        return out[1] if len(out) == 2 else np.concatenate(out)

    def all_logits(self, indices: np.ndarray) -> np.ndarray:
        """Teacher forcing: float32 logits (n, K, h, w) at every position given the whole
        grid, computed exactly as a decoder stepping through ``logits`` computes them
        (one full pass when the model has no step graph)."""
        if self.next != 0:
            raise InvalidInput("all_logits needs a fresh prior stepper")
        h, w = self.grid
        if self.session is None:
            self.next = h * w
            return self.runtime.prior_logits(indices)
        per_pos = [self.logits(p, indices) for p in range(h * w)]
        return np.stack(per_pos, axis=2).reshape(self.n, -1, h, w)
