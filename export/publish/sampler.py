"""A vae's learned sampling prior: check, export and attach ``sampler.onnx``.

The contract (``latentserve.worker.runtime.manifest``, sampling kind "learned")::

    noise float32 (N, d) ~ N(0, I), times the temperature -> sampler -> latent float32
    (N, C, h, w), the decoder's latent shape; row i depends on noise row i alone.

A module may give the latent flat, (N, C*h*w): ``SamplerWrapper`` reshapes it. Two users:

- ``custom.export_model(..., sampler=LearnedSampler(module, noise_dim))`` exports it with
  the user's own vae;
- ``add_sampler`` derives a new version of an exported vae that keeps its encoder,
  decoder and code tables byte for byte (so compression and its figures are unchanged)
  and adds a sampler: how the zoo's mnist-vae:2 is made from mnist-vae:1
  (``latentserve sampler``, ``export.training.sampler``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from latentserve.errors import InvalidInput
from latentserve.export.publish import contract
from latentserve.export.publish.exporter import PARITY_TOLERANCE, ExportParityError, onnx_export
from latentserve.export.publish.halves import store_exact_halves
from latentserve.export.publish.writer import (
    append_registry,
    check_target,
    measure_quality,
    seal_and_move,
)
from latentserve.worker.runtime.manifest import parse_manifest, sha256_file

SAMPLER_FILE = "sampler.onnx"
CONTRACT_BATCH = 8


@dataclass(frozen=True)
class LearnedSampler:
    """A vae's learned sampling prior: ``module`` maps noise (N, ``noise_dim``) ~ N(0, I)
    to the decoder's latent (N, C, h, w) or flat (N, C*h*w). ``method`` is recorded in
    the manifest (e.g. "two-stage vae (Dai & Wipf 2019)")."""

    module: nn.Module
    noise_dim: int
    method: str = "learned"


class SamplerWrapper(nn.Module):
    """noise (N, d) -> the user's sampler -> latent (N, C, h, w)."""

    def __init__(self, module: nn.Module, latent_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.module, self.latent_shape = module, tuple(int(s) for s in latent_shape)

    def forward(self, noise: Tensor) -> Tensor:
        out: Tensor = self.module(noise)
        if out.dim() == 2 and out.shape[1] == int(np.prod(self.latent_shape)):
            out = out.reshape(out.shape[0], *self.latent_shape)
        return out


def contract_noise(noise_dim: int, n: int = CONTRACT_BATCH, seed: int = 0) -> np.ndarray:
    """The noise the contract and parity checks feed: float32 (n, noise_dim)."""
    return np.random.default_rng(seed).standard_normal((n, noise_dim)).astype(np.float32)


def check_sampler(run: contract.Run, noise_dim: int, latent_shape: tuple[int, ...], *,
                  what: str = "sampler") -> np.ndarray:
    """Run the sampler contract on N(0, I) noise; returns its latents (N, C, h, w)."""
    if not isinstance(noise_dim, int) or isinstance(noise_dim, bool) or noise_dim < 1:
        raise InvalidInput(f"{what} input 'noise' needs noise_dim >= 1 numbers per sample, "
                           f"got {noise_dim!r}")
    noise = contract_noise(noise_dim)
    out = contract.call(run, noise, what=what, given="noise")
    want = (len(noise), *latent_shape)
    if out.dtype.kind != "f" or tuple(out.shape) != want:
        raise InvalidInput(
            f"{what} output 'latent' is {out.dtype} {tuple(out.shape)} for noise "
            f"{tuple(noise.shape)}; expected float latents {want} (N x the decoder's latent "
            f"shape {tuple(latent_shape)}, or flat (N, {int(np.prod(latent_shape))}))")
    if not np.all(np.isfinite(out)):
        raise InvalidInput(f"{what} output 'latent' holds NaN or infinite values")
    contract.check_batch_invariant(run, noise, out, what=what, tensor="latent")
    return out


def torch_run(module: nn.Module) -> contract.Run:
    """A torch module as the contract's numpy callable (no grad)."""
    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        out: Tensor = module(torch.as_tensor(x))
        return out.numpy()
    return run


def session_run(path: Path) -> contract.Run:
    """An ONNX file's first input -> first output on onnxruntime's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def export_sampler(sampler: LearnedSampler, latent_shape: tuple[int, ...], path: Path) -> float:
    """Check ``sampler`` on torch, export it to ``path`` (``noise`` -> ``latent``, dynamic
    batch), check the ONNX graph and its parity; returns the largest |onnx - torch|."""
    sampler.module.eval()
    wrapped = SamplerWrapper(sampler.module, latent_shape).eval()
    want = check_sampler(torch_run(wrapped), sampler.noise_dim, latent_shape)
    try:
        onnx_export(wrapped, torch.as_tensor(contract_noise(sampler.noise_dim, 2)), path,
                    input_name="noise", output_name="latent")
    except Exception as exc:  # noqa: BLE001 - the tracer raises anything
        raise InvalidInput(f"the sampler cannot be exported to ONNX: {exc}") from None
    store_exact_halves(path)
    got = check_sampler(session_run(path), sampler.noise_dim, latent_shape,
                        what="sampler.onnx")
    diff = float(np.abs(got - want).max(initial=0.0))
    if not diff <= PARITY_TOLERANCE:
        raise ExportParityError(f"sampler.onnx differs from torch by {diff:.3g}; the limit is "
                                f"{PARITY_TOLERANCE}")
    return diff


def learned_sampling(sampler: LearnedSampler) -> dict[str, Any]:
    """The manifest's ``sampling`` block for a learned sampler."""
    return {"kind": "learned", "noise_dim": int(sampler.noise_dim), "method": sampler.method}


def add_sampler(*, base: str | Path, repo: str | Path, name: str, version: int,
                sampler: LearnedSampler, example_images: np.ndarray,
                provenance: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``<repo>/<name>/<version>/``: the vae version in folder ``base`` with its
    encoder, decoder and code tables unchanged and ``sampler`` as its sampling prior.

    ``example_images`` (uint8 (N, C, H, W), e.g. the validation split): measured for the
    manifest's ``quality`` (as the base was), the first few recorded in ``check.npz``;
    ``provenance`` goes to ``training.sampler``. Returns the new folder.
    """
    from latentserve.worker.codec.codes import LatentCodec
    from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime
    from latentserve.worker.runtime.model_check import make_record
    from latentserve.worker.runtime.repository import ModelRepository

    base = Path(base)
    raw = json.loads((base / "manifest.json").read_bytes())
    old = parse_manifest((base / "manifest.json").read_bytes(), where=str(base / "manifest.json"))
    if old.family not in ("vae", "ae") or old.any_size or (
            old.family == "ae" and old.code_kind != "factorized"):
        raise InvalidInput(f"{base} is a{'n any-size' if old.any_size else ''} {old.family} "
                           f"model with code kind {old.code_kind!r}; a learned sampler is for "
                           "a fixed-size vae, or a fixed-size ae with code kind 'factorized'")
    repo = Path(repo)
    target = check_target(repo, name, version, overwrite)
    repo.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=repo, prefix=".export-") as tmp:
        folder = Path(tmp) / name / str(version)
        folder.mkdir(parents=True)
        files: dict[str, Any] = {}
        for role in ("encoder", "decoder"):
            entry = old.files[role]
            shutil.copyfile(base / entry.path, folder / entry.path)
            if sha256_file(folder / entry.path) != entry.sha256:
                raise InvalidInput(f"{base / entry.path} does not match its manifest digest")
            files[role] = {"path": entry.path, "sha256": entry.sha256}
        diff = export_sampler(sampler, old.latent_shape, folder / SAMPLER_FILE)
        files["sampler"] = {"path": SAMPLER_FILE, "sha256": sha256_file(folder / SAMPLER_FILE)}
        manifest = {**raw, "name": name, "version": version, "files": files,
                    "sampling": learned_sampling(sampler)}
        manifest["quality"] = {**raw.get("quality", {}), "sampler_onnx_max_abs_diff": diff}
        manifest["training"] = {**raw.get("training", {}), "sampler": provenance or {}}
        manifest["source"] = {**raw.get("source", {}), "derived_from": f"{old.ref}",
                              "derived_manifest_sha256": old.digest}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        runtime = ModelRuntime(ModelRepository(tmp).load(f"{name}:{version}"),
                               EngineConfig(intra_op_threads=1))
        codec = LatentCodec(runtime)
        # Measured again through the runtime: the same graphs and tables give the base's.
        manifest["quality"].update(measure_quality(runtime, codec, example_images))
        record_bytes = make_record(runtime, codec, example_images)
        del runtime, codec
        digest = seal_and_move(folder, target, manifest, record_bytes)
    append_registry(repo, name, version, digest)
    return target
