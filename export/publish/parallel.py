"""A vqvae version with a parallel prior (code kind 4, vq_parallel) from a shipped one.

The new version keeps the base version's ``encoder.onnx`` and ``decoder.onnx`` (byte
for byte) and its static tables (the fallback), and ships the parallel prior as
``prior.onnx`` (``indices``, ``group`` -> ``logits``; no ``prior_step.onnx``). The
manifest records the schedule (``code.vq_parallel.schedule``), the same integer-table
rule as kind 3 (logit_scale, guard, lut), the prior's training provenance, and the
validation figures measured through the worker's runtime and codec::

    python -m latentserve.export.publish.parallel --base models/mnist-vqvae/1 \\
        --prior runs/zoo/mnist-vqvae-parallel.pt --repo models --version 2
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentserve.errors import InvalidInput
from latentserve.export.nets.parallel_prior import ParallelPrior
from latentserve.export.publish import tables
from latentserve.export.publish.exporter import OPSET, PARITY_TOLERANCE, ExportParityError
from latentserve.export.publish.writer import append_registry, check_target, dumps, seal_and_move
from latentserve.export.training.data import load_dataset
from latentserve.export.training.parallel_prior import load_parallel_prior
from latentserve.worker.runtime.manifest import sha256_file
from latentserve.worker.runtime.quality import mean_psnr
from latentserve.worker.runtime.repository import ModelRepository


def export_parallel_onnx(prior: ParallelPrior, path: Path, example: np.ndarray) -> None:
    """Trace the prior to ONNX: ``indices`` (N, h, w) int64, ``group`` () int64 ->
    ``logits`` (N, P, K), dynamic batch."""
    prior.eval()
    idx = torch.as_tensor(example, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(prior, (idx, torch.tensor(0)), str(path),
                          input_names=["indices", "group"], output_names=["logits"],
                          opset_version=OPSET, dynamo=False,
                          dynamic_axes={"indices": {0: "N"}, "logits": {0: "N"}})
    import onnx

    onnx.checker.check_model(str(path))


@torch.no_grad()
def _parity(prior: ParallelPrior, runtime: Any, indices: np.ndarray) -> float:
    """Max |onnxruntime - torch| of every group's logits on ``indices``."""
    worst = 0.0
    idx = torch.as_tensor(indices, dtype=torch.long)
    for g, members in enumerate(prior.config.groups()):
        ref = prior(idx, torch.tensor(g))[:, :len(members)].numpy()
        worst = max(worst, float(np.abs(runtime.group_logits(indices, g) - ref).max()))
    if not worst <= PARITY_TOLERANCE:
        raise ExportParityError(f"the parallel prior's onnxruntime logits differ from torch "
                                f"by {worst:.3g}; the limit is {PARITY_TOLERANCE}")
    return worst


def _quality(runtime: Any, codec: Any, val: np.ndarray, static: dict[str, Any]
             ) -> dict[str, Any]:
    """Validation figures through the runtime and the codec's integer tables."""
    from latentserve.worker.codec.codes import VQ_STATIC

    symbols = runtime.encode(val)
    idx = symbols.astype(np.int64)
    n = idx[0].size
    codes = codec.encode_payloads(symbols)
    kinds = [k for k, _ in codes]
    used = codec.cross_entropy_bits(symbols, kinds)
    # The indices under the integer tables alone (as mnist-vqvae:1 reports it; the code
    # adds the offset symbol and the 16-bit check, in val_bits_per_image).
    _, probs = codec.prior_plan(symbols)
    flat_idx = idx.reshape(len(idx), -1)
    coded = -np.log2(np.take_along_axis(probs, flat_idx[..., None], 2)[..., 0]).sum(1)
    flat = runtime.parallel_logits(idx).transpose(0, 2, 1)  # (N, K, h*w)
    ideal = tables.softmax_bits(idx, flat.reshape(len(idx), flat.shape[1], *idx.shape[1:]))
    static_bits = tables.vq_static_bits(idx, static)
    return {
        "val_images": int(len(val)),
        "val_psnr_db": round(float(mean_psnr(val, runtime.decode(symbols))), 3),
        "val_bits_per_image": round(float(used.mean()), 2),
        "val_bits_per_index_prior": round(float(coded.mean() / n), 4),
        "val_bits_per_index_prior_float": round(float(ideal.mean() / n), 4),
        "val_bits_per_index_static": round(float(static_bits.mean() / n), 4),
        "val_bits_per_image_static": round(float(static_bits.mean()), 2),
        "val_fallback_share": round(kinds.count(VQ_STATIC) / len(kinds), 4),
        "val_bytes_per_image_estimate": round(float(used.mean()) / 8, 2),
        "codes_used": int(len(np.unique(idx))),
    }


def publish_parallel(*, base: str | Path, ckpt: dict[str, Any], repo: str | Path,
                     version: int, name: str | None = None, data: str | Path | None = None,
                     overwrite: bool = False) -> Path:
    """Write ``<repo>/<name>/<version>/`` from the base vqvae version's folder and a parallel
    prior checkpoint (``export.training.parallel_prior``); returns that folder."""
    from latentserve.worker.codec.codes import LatentCodec
    from latentserve.worker.runtime.engine import ModelRuntime
    from latentserve.worker.runtime.model_check import make_record

    base = Path(base)
    raw = json.loads((base / "manifest.json").read_text())
    if raw.get("family") != "vqvae":
        raise InvalidInput(f"{base}: a parallel prior goes on a vqvae, not {raw.get('family')!r}")
    name = name or str(raw["name"])
    repo = Path(repo)
    target = check_target(repo, name, version, overwrite)
    prior = load_parallel_prior(ckpt)
    pc = prior.config
    grid = tuple(raw["latent"]["shape"])
    if tuple(pc.grid) != grid or pc.num_codes != raw["code"]["vq_static"]["num_codes"]:
        raise InvalidInput(f"the prior is for a {pc.grid} grid of {pc.num_codes} codes; "
                           f"{base} has {grid} and {raw['code']['vq_static']['num_codes']}")
    ds = load_dataset(data or Path(__file__).resolve().parents[2].parent / "shared/data/mnist")
    if ds.sha256 != ckpt["train"]["data_sha256"]:
        raise InvalidInput("the data is not what the prior was trained on")
    rule = raw["code"].get("vq_prior") or tables.vq_prior_spec()
    manifest = copy.deepcopy(raw)
    manifest["version"] = version
    manifest["code"] = {"kind": "vq_parallel", "vq_static": raw["code"]["vq_static"],
                        "vq_parallel": {"logit_scale": rule["logit_scale"],
                                        "guard": rule["guard"], "lut": rule["lut"],
                                        "schedule": pc.groups()}}
    manifest["sampling"] = {"kind": "prior"}
    manifest["training"] = dict(raw.get("training", {}))
    manifest["training"]["prior"] = {
        "kind": "parallel", "config": pc.to_dict(), **ckpt["train"],
        "codes_from": f"{raw['name']}:{raw['version']} encoder.onnx (onnxruntime)",
        "final_train_bits_per_index": round(ckpt["history"][-1]["bits_per_index"], 4)}
    repo.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=repo, prefix=".export-") as tmp:
        folder = Path(tmp) / name / str(version)
        folder.mkdir(parents=True)
        for role in ("encoder", "decoder"):
            shutil.copyfile(base / raw["files"][role]["path"], folder / f"{role}.onnx")
        export_parallel_onnx(prior, folder / "prior.onnx", np.zeros((2, *grid), np.int64))
        manifest["files"] = {role: {"path": f"{role}.onnx",
                                    "sha256": sha256_file(folder / f"{role}.onnx")}
                             for role in ("encoder", "decoder", "prior")}
        manifest["quality"] = {}
        (folder / "manifest.json").write_text(dumps(manifest))
        runtime = ModelRuntime(ModelRepository(tmp).load(f"{name}:{version}"))
        codec = LatentCodec(runtime)
        max_diff = _parity(prior, runtime, runtime.encode(ds.val[:64]).astype(np.int64))
        quality = _quality(runtime, codec, ds.val, raw["code"]["vq_static"])
        quality["onnx_max_abs_diff"] = max_diff
        manifest["quality"] = quality
        record = make_record(runtime, codec, ds.val)
        del runtime, codec
        digest = seal_and_move(folder, target, manifest, record)
    append_registry(repo, name, version, digest)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the vqvae version folder to build on")
    p.add_argument("--prior", required=True, help="a parallel prior checkpoint (.pt)")
    p.add_argument("--repo", default="models")
    p.add_argument("--name", default=None, help="default: the base model's name")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--data", default=None, help="the MNIST data the prior was trained on")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    ckpt = torch.load(args.prior, map_location="cpu", weights_only=False)
    out = publish_parallel(base=args.base, ckpt=ckpt, repo=args.repo, version=args.version,
                           name=args.name, data=args.data, overwrite=args.overwrite)
    print(f"wrote {out}: {json.loads((out / 'manifest.json').read_text())['quality']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
