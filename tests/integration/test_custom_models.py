"""Imported and user-exported models served for real: codes outlive the server that made
them and the process; `models check`; the server's load-time check; the example runs."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from custom_graphs import VQDec, VQEnc, block_decoder, pool_encoder, samples, torch_onnx
from latentserve.cli import main
from latentserve.errors import ModelIntegrityError
from latentserve.export.publish.onnx_import import import_onnx
from latentserve.service.client.inference import LatentServeClient, ServiceError
from latentserve.service.jobs.settings import JobSettings
from latentserve.service.server.assemble import Server, create_server
from latentserve.service.server.config import ServiceConfig
from latentserve.worker.runtime.manifest import sha256_file
from latentserve.worker.runtime.model_check import check_at_load, check_model
from latentserve.worker.runtime.pipeline import Pipeline
from latentserve.worker.runtime.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0
torch.set_num_threads(1)


def serve(repo: Path) -> Server:
    config = ServiceConfig(jobs=JobSettings.off(),
                           host="127.0.0.1", port=0, metrics_port=None, models=repo,
                           intra_op_threads=1, compute_workers=1, grpc_threads=8)
    server, _ = create_server(config)
    server.start()
    return server


@pytest.fixture()
def imported(tmp_path: Path) -> Iterator[Path]:
    """A repository with an imported helper-graph ae and an imported torch-made vqvae."""
    repo = tmp_path / "models"
    import_onnx(family="ae", encoder=pool_encoder(tmp_path / "e.onnx"),
                decoder=block_decoder(tmp_path / "d.onnx"), images=samples(), repo=repo,
                name="pool-ae", version=1, input_range=255.0)
    torch.manual_seed(0)
    book = torch.randn(8, 4)
    enc = torch_onnx(VQEnc(book), torch.zeros(2, 3, 16, 16), tmp_path / "ve.onnx", ["x"], ["i"])
    dec = torch_onnx(VQDec(book), torch.zeros(2, 4, 4, dtype=torch.int32), tmp_path / "vd.onnx",
                     ["i"], ["y"])
    import_onnx(family="vqvae", encoder=enc, decoder=dec, images=samples((3, 16, 16)), repo=repo,
                name="their-vq", version=1, num_codes=8, output_range=255.0)
    yield repo


def test_imported_codes_decode_after_a_restart_and_in_another_process(imported: Path,
                                                                      tmp_path: Path) -> None:
    grey, rgb = samples(n=5), samples((3, 16, 16), n=5)
    server = serve(imported)
    try:
        with LatentServeClient(server.target, timeout=TIMEOUT) as client:
            codes = {"pool-ae": client.compress(grey, model="pool-ae"),
                     "their-vq": client.compress(rgb, model="their-vq")}
            first = {k: client.reconstruct(v) for k, v in codes.items()}
    finally:
        server.stop(0).wait(TIMEOUT)
    server = serve(imported)  # a restart: a fresh server over the same files
    try:
        with LatentServeClient(server.target, timeout=TIMEOUT) as client:
            for name, c in codes.items():
                assert np.array_equal(client.reconstruct(c), first[name])
    finally:
        server.stop(0).wait(TIMEOUT)
    blob = tmp_path / "codes.json"
    blob.write_text(json.dumps({k: [c.hex() for c in v] for k, v in codes.items()}))
    script = ("import json, sys, numpy as np\n"
              "from latentserve.worker.runtime.pipeline import Pipeline\n"
              "codes = json.load(open(sys.argv[2]))\n"
              "p = Pipeline(sys.argv[1])\n"
              "out = {k: p.reconstruct([bytes.fromhex(c) for c in v]) for k, v in codes.items()}\n"
              "np.savez(sys.argv[3], **out)\n")
    subprocess.run([sys.executable, "-c", script, str(imported), str(blob),
                    str(tmp_path / "out.npz")], check=True, timeout=TIMEOUT, cwd=ROOT)
    with np.load(tmp_path / "out.npz") as other:
        for name in codes:
            assert np.array_equal(other[name], first[name])


def test_models_check_prints_one_verdict_per_check(imported: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "check", "their-vq", "--repo", str(imported)]) == 0
    out = capsys.readouterr().out
    for check in ("digests", "parity", "round trip", "batch invariance", "code size",
                  "throughput"):
        assert any(line.split()[1:2] == [check.split()[0]] and line.split()[0] == "PASS"
                   for line in out.splitlines()), (check, out)
    assert main(["models", "check", "pool-ae", "--repo", str(imported), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and [c["check"] for c in doc["checks"]][0] == "digests"


def test_damaged_file_fails_digests(imported: Path) -> None:
    onnx_path = imported / "pool-ae" / "1" / "decoder.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    verdicts = check_model(ModelRepository(imported), "pool-ae", timing_s=0.05)
    assert verdicts[0].status == "FAIL" and "decoder.onnx" in verdicts[0].detail
    assert {v.status for v in verdicts[1:]} == {"SKIP"}
    assert main(["models", "check", "pool-ae", "--repo", str(imported)]) == 1


def _tamper_record(repo: Path, name: str) -> None:
    """Record other decoder values, and re-sign the record so the digests still match."""
    folder = repo / name / "1"
    with np.load(folder / "check.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["decoder"] = np.clip(arrays["decoder"] + 0.05, 0, 1).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (folder / "check.npz").write_bytes(buf.getvalue())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["check"]["sha256"] = sha256_file(folder / "check.npz")
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_load_time_check_refuses_graphs_that_differ_from_the_record(imported: Path) -> None:
    _tamper_record(imported, "pool-ae")
    runtime = Pipeline(imported).runtime("pool-ae")
    with pytest.raises(ModelIntegrityError, match="decoder output 'image' differs from the "
                                                  "recorded values"):
        check_at_load(runtime)
    parity = check_model(ModelRepository(imported), "pool-ae", timing_s=0.05)[1]
    assert parity.check == "parity" and parity.status == "FAIL"
    server = serve(imported)
    try:
        with LatentServeClient(server.target, timeout=TIMEOUT) as client:
            with pytest.raises(ServiceError, match="recorded values"):
                client.compress(samples(n=1), model="pool-ae")
            assert len(client.compress(samples((3, 16, 16), n=1), model="their-vq")) == 1
    finally:
        server.stop(0).wait(TIMEOUT)


def test_zoo_export_records_values_that_check_passes(tiny_repo: Path) -> None:
    verdicts = check_model(ModelRepository(tiny_repo), "tiny-vqvae", timing_s=0.05)
    assert [(v.check, v.status) for v in verdicts][:2] == [("digests", "PASS"), ("parity", "PASS")]
    assert all(v.status == "PASS" for v in verdicts), verdicts


def test_custom_model_example_runs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("custom_model",
                                                  ROOT / "examples" / "custom_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.main(["--repo", str(tmp_path / "models"), "--steps", "20", "--images", "48"])
    assert figures["images"] == 32
    assert figures["bytes_per_image"] < figures["raw_bytes_per_image"] / 20
    assert figures["psnr_db"] > 12
    manifest = json.loads((tmp_path / "models" / "shapes-ae" / "1" / "manifest.json").read_text())
    assert manifest["image"]["channels"] == 3 and manifest["image"]["height"] == 64
