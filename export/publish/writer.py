"""Write one repository version from ONNX graphs that follow the I/O contract (no torch).

Used by the torch API (``export.custom``) and by ``latentserve import``. Given a folder
the caller's ``build`` fills with ``encoder.onnx``, ``decoder.onnx`` (and, for a vqvae with
a learned prior, ``prior.onnx``), ``write_version``:

1. checks the graphs against the family contract on the sample images
   (``export.contract``: dtypes, shapes, dynamic batch, batch invariance, causal prior);
2. freezes the integer tables from the encoder's outputs on those images (a histogram,
   or the caller's own factorised density; VQ static tables, and a constant-logits
   ``prior.onnx`` when there is no learned prior) and the sampling density;
3. writes the manifest, loads the version with the worker's own runtime, measures rate
   and PSNR through it, records ``check.npz`` (``worker.model_check``), and moves the
   folder into place and appends ``registry.json``, as the zoo's exporter does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentserve.errors import InvalidInput
from latentserve.export.publish import contract, tables
from latentserve.export.publish.static_prior import write_static_prior
from latentserve.export.training.data import images_sha256
from latentserve.worker.runtime.manifest import manifest_fields, parse_manifest, sha256_file
from latentserve.worker.runtime.quality import mean_psnr
from latentserve.worker.runtime.repository import REGISTRY_FILE, ModelRepository, read_registry

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CONTRACT_BATCH = 8
DEFAULT_VAE_STEP = 0.5
FactorizedFit = Callable[[np.ndarray], dict[str, Any]]


def dumps(obj: Any) -> str:
    """Indented JSON with innermost number lists on one line (tables stay readable)."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[[^\[\]{}\"]*\]",
                  lambda m: json.dumps(json.loads(m.group(0)), separators=(",", ":")), text) + "\n"


def append_registry(repo: Path, name: str, version: int, digest: str) -> None:
    """Add one exported version to ``<repo>/registry.json`` (never removes entries)."""
    models = read_registry(repo)
    models.append({"name": name, "version": version, "manifest_sha256": digest})
    tmp = repo / (REGISTRY_FILE + ".tmp")
    tmp.write_text(json.dumps({"models": models}, indent=1) + "\n")
    os.replace(tmp, repo / REGISTRY_FILE)

def seal_and_move(folder: Path, target: Path, manifest: dict[str, Any], record: bytes) -> str:
    """Write the check record (``check.npz``, listed in the manifest's files) and the final
    manifest into ``folder``, then move the folder to ``target``, replacing what is there.
    Returns the manifest's sha256, for ``append_registry`` once the temporary folder is gone."""
    from latentserve.worker.runtime.model_check import CHECK_FILE, CHECK_ROLE

    (folder / CHECK_FILE).write_bytes(record)
    manifest["files"][CHECK_ROLE] = {"path": CHECK_FILE, "sha256": sha256_file(folder / CHECK_FILE)}
    text = dumps(manifest)
    parse_manifest(text.encode(), where=f"the manifest written for {target}")
    (folder / "manifest.json").write_text(text)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, target)
    return hashlib.sha256(text.encode()).hexdigest()


Measure = Callable[[Any, Any], dict[str, Any]]


def finish_version(staging: Path, folder: Path, target: Path, manifest: dict[str, Any], *,
                   measure: Measure, check_images: np.ndarray) -> str:
    """The tail every exporter shares, run inside its staging repository ``staging``
    (``folder`` = ``staging/<name>/<version>``, the graphs and tables already there):
    write the manifest, load the version with the worker's own runtime and codec, put
    ``measure(runtime, codec)`` (the exporter's quality figures; it may raise, e.g. on a
    failed parity check) into ``manifest["quality"]``, record ``check.npz`` on
    ``check_images`` and ``seal_and_move`` to ``target``. Returns the manifest's sha256
    for ``append_registry``, which the caller runs once the staging folder is gone."""
    from latentserve.worker.codec.codes import LatentCodec
    from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime
    from latentserve.worker.runtime.model_check import make_record

    (folder / "manifest.json").write_text(dumps(manifest))
    ref = f"{manifest['name']}:{manifest['version']}"
    runtime = ModelRuntime(ModelRepository(staging).load(ref), EngineConfig(intra_op_threads=1))
    codec = LatentCodec(runtime)
    manifest["quality"] = measure(runtime, codec)
    record = make_record(runtime, codec, check_images)
    del runtime, codec  # close the sessions before their folder moves
    return seal_and_move(folder, target, manifest, record)


def check_target(repo: Path, name: str, version: int, overwrite: bool) -> Path:
    """The version's folder, refusing a bad name or version or an existing folder."""
    if not NAME_RE.match(name):
        raise InvalidInput(f"model name {name!r} must match {NAME_RE.pattern}")
    if version < 1:
        raise InvalidInput(f"model version must be >= 1, got {version}")
    target = repo / name / str(version)
    if target.exists() and not overwrite:
        raise InvalidInput(f"{target} already exists; pick a new version (or overwrite)")
    return target


@dataclass(frozen=True)
class LatentCoding:
    """How the latent is coded: the step (ae / vae), the codebook size (vqvae), and
    optionally the caller's own factorised tables (``fit(symbols) -> factorized spec``)."""

    step: float = 1.0
    num_codes: int | None = None
    fit: FactorizedFit | None = field(default=None, compare=False)
    # Code kind hyperprior (the build writes hyper_encoder.onnx and hyper_decoder.onnx):
    # z's tables from ``hyper_fit(z symbols)``, or their histogram when None.
    hyper: bool = False
    hyper_fit: FactorizedFit | None = field(default=None, compare=False)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _runner(session: Any) -> contract.Run:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _batched(run: contract.Run, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)])


def fit_code(family: str, encoded: np.ndarray, coding: LatentCoding, *, has_prior: bool,
             seed: int = 0, gmm_components: int = 10) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's ``code`` and ``sampling`` from the encoder's outputs on the samples."""
    if family == "vqvae":
        k = coding.num_codes
        if k is None:
            raise InvalidInput("a vqvae needs its codebook size (num_codes)")
        top = int(encoded.max(initial=0))
        if top >= k:
            raise InvalidInput(f"encoder output 'indices' reaches {top}, but the codebook has "
                               f"{k} codes (0..{k - 1})")
        static = tables.vq_static_tables(encoded.astype(np.int64), k)
        if has_prior:
            return ({"kind": "vq_prior", "vq_static": static, "vq_prior": tables.vq_prior_spec()},
                    {"kind": "prior"})
        return {"kind": "vq_static", "vq_static": static}, {"kind": "prior", "prior": "static"}
    if not coding.step > 0:
        raise InvalidInput(f"the quantisation step must be > 0, got {coding.step}")
    symbols = np.rint(encoded.astype(np.float64) / coding.step).astype(np.int64)
    spec = (coding.fit(symbols) if coding.fit is not None
            else tables.histogram_tables(symbols, step=coding.step))
    code = {"kind": "factorized", "factorized": spec}
    if family == "ae":
        flat = encoded.reshape(len(encoded), -1).astype(np.float64)
        return code, tables.fit_diag_gmm(flat, gmm_components, seed=seed)
    return code, {"kind": "gaussian"}


def fit_hyperprior(folder: Path, files: dict[str, str], encoded: np.ndarray,
                   code: dict[str, Any], coding: LatentCoding) -> dict[str, Any]:
    """The hyperprior's code spec: check both hyper graphs on the samples' rounded latents,
    fit z's tables, add the Gaussian tables (y's histogram stays, as the fallback)."""
    for role in ("hyper_encoder", "hyper_decoder"):
        if role not in files:
            raise InvalidInput(f"a hyperprior export needs {role}.onnx; the build wrote "
                               f"{sorted(files)}")
    if float(code["factorized"]["step"]) != 1.0:
        raise InvalidInput("a hyperprior codes the rounded latent: the step must be 1")
    y_hat = np.rint(encoded.astype(np.float64)).astype(np.float32)
    h_a = _runner(_session(folder / files["hyper_encoder"]))
    contract.check_hyper_encoder(h_a, y_hat[:CONTRACT_BATCH])
    z = np.rint(_batched(h_a, y_hat).astype(np.float64)).astype(np.int64)
    z_spec: dict[str, Any] = (coding.hyper_fit(z) if coding.hyper_fit is not None
                              else tables.histogram_tables(z, step=1.0))
    lo = np.array(z_spec["offsets"]).reshape(1, -1, 1, 1)
    hi = lo + np.array([len(f) for f in z_spec["freqs"]]).reshape(1, -1, 1, 1) - 1
    h_s = _runner(_session(folder / files["hyper_decoder"]))
    contract.check_hyper_decoder(h_s, np.clip(z, lo, hi)[:CONTRACT_BATCH].astype(np.float32),
                                 tuple(encoded.shape[1:]))
    return {"kind": "hyperprior", "factorized": code["factorized"],
            "hyperprior": tables.hyperprior_spec(code["factorized"], z_spec, list(z.shape[1:]))}


def measure_quality(runtime: Any, codec: Any, images: np.ndarray) -> dict[str, Any]:
    """Rate and PSNR on ``images`` through the worker's runtime, codec and integer tables."""
    from latentserve.worker.codec.codes import parse_header

    symbols = runtime.encode(images)
    codes = codec.encode(symbols)
    recon = runtime.decode(codec.decode(codes))
    bits = codec.cross_entropy_bits(symbols, [parse_header(c).kind for c in codes])
    return {"val_images": int(len(images)),
            "val_psnr_db": round(float(mean_psnr(images, recon)), 3),
            "val_bits_per_image": round(float(bits.mean()), 2),
            "val_bytes_per_image_estimate": round(float(bits.mean()) / 8, 2),
            "val_code_bytes_per_image": round(float(np.mean([len(c) for c in codes])), 2)}


def write_version(*, repo: str | Path, name: str, version: int, family: str,
                  images: np.ndarray, build: Callable[[Path], dict[str, str]],
                  coding: LatentCoding, source: dict[str, Any],
                  parity: Callable[[Path], float] | None = None,
                  val_images: np.ndarray | None = None, opset: int = 17,
                  producer: str = "latentserve", seed: int = 0, gmm_components: int = 10,
                  sampling: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Check, tabulate, measure and write ``<repo>/<name>/<version>/``; returns that folder.

    ``images``: uint8 (N, C, H, W) samples the tables are fitted on; ``val_images`` (default
    the same) are measured. ``parity(folder) -> max |diff|`` compares the ONNX files with
    their source (the torch API's check) and raises when they differ. ``sampling``
    replaces the fitted sampling block: a vae's learned sampler (``build`` then writes
    ``sampler.onnx``, checked here against the latent shape, ``export.sampler``).
    """
    if family not in ("ae", "vae", "vqvae"):
        raise InvalidInput(f"family {family!r} is not one of ae, vae, vqvae")
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) < 2:
        raise InvalidInput(f"sample images must be uint8 (N, C, H, W) with N >= 2, got "
                           f"{images.dtype} {tuple(images.shape)}")
    repo = Path(repo)
    target = check_target(repo, name, version, overwrite)
    _, c, h, w = images.shape
    image_shape = (int(c), int(h), int(w))
    repo.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=repo, prefix=".export-") as tmp:
        folder = Path(tmp) / name / str(version)
        folder.mkdir(parents=True)
        files = dict(build(folder))
        enc = _runner(_session(folder / files["encoder"]))
        contract.check_encoder(enc, images[:CONTRACT_BATCH], family)
        encoded = _batched(enc, images)
        latent_shape = [int(s) for s in encoded.shape[1:]]
        has_prior = "prior" in files
        code, fitted = fit_code(family, encoded, coding, has_prior=has_prior, seed=seed,
                                gmm_components=gmm_components)
        if "sampler" in files:
            from latentserve.export.publish.sampler import check_sampler

            if family == "vqvae" or sampling is None or sampling.get("kind") != "learned":
                raise InvalidInput("a sampler.onnx needs family 'vae' or 'ae' and sampling "
                                   "kind 'learned' (with its noise_dim)")
            check_sampler(_runner(_session(folder / files["sampler"])),
                          int(sampling["noise_dim"]), tuple(latent_shape), what="sampler.onnx")
        sampling = sampling or fitted
        head = encoded[:CONTRACT_BATCH]
        if family == "vqvae":
            feed = head.astype(np.int64)
            if has_prior:
                contract.check_prior(_runner(_session(folder / files["prior"])), feed,
                                     int(code["vq_static"]["num_codes"]))
            else:
                write_static_prior(code["vq_static"], (latent_shape[0], latent_shape[1]),
                                   folder / "prior.onnx", opset=opset)
                files["prior"] = "prior.onnx"
        else:
            step = float(code["factorized"]["step"])
            feed = (np.rint(head / step) * step).astype(np.float32)
        if coding.hyper:
            code = fit_hyperprior(folder, files, encoded, code, coding)
        contract.check_decoder(_runner(_session(folder / files["decoder"])), feed, image_shape)
        max_diff = parity(folder) if parity is not None else None

        manifest = manifest_fields(name=name, version=version, family=family,
                                 image_shape=image_shape, latent_shape=latent_shape,
                                 folder=folder, files=files, opset=opset, producer=producer,
                                 code=code, sampling=sampling)
        manifest["source"] = source
        manifest["training"] = {"data_sha256": images_sha256(images),
                                "num_train": int(len(images)), "seed": seed}

        def quality(runtime: Any, codec: Any) -> dict[str, Any]:
            out = measure_quality(runtime, codec, images if val_images is None else val_images)
            if max_diff is not None:
                out["onnx_max_abs_diff"] = max_diff
            return out

        digest = finish_version(Path(tmp), folder, target, manifest, measure=quality,
                                check_images=images)
    append_registry(repo, name, version, digest)
    return target
