"""A hyperprior model (code kind 5) served for real: unary and streamed compress and
reconstruct over gRPC, a compress job through the embedded Valkey and its worker, and the
codes decoding in another process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hyperprior_models import built_repo, digits
from latentserve.service.client.inference import LatentServeClient
from latentserve.service.client.jobs import JobsClient
from latentserve.service.jobs.settings import JobSettings
from latentserve.service.server.assemble import create_server
from latentserve.service.server.config import ServiceConfig
from latentserve.v1 import jobs_pb2 as pb
from latentserve.worker.codec.codes import HYPERPRIOR, parse_header
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0


def test_hyperprior_codes_over_grpc_streams_and_jobs(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    repo = built_repo(tmp_path)
    x = digits(24, seed=3)
    want = Pipeline(repo, EngineConfig(intra_op_threads=1))
    codes = want.compress("hp", x)
    assert sum(parse_header(c).kind == HYPERPRIOR for c in codes) >= 22
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("LATENTSERVE_REDIS_URL", raising=False)
    config = ServiceConfig(host="127.0.0.1", port=0, metrics_port=None, models=repo,
                           intra_op_threads=1, compute_workers=1, preload=False, grace_s=5,
                           jobs=JobSettings(state_dir=tmp_path / "state",
                                            queue=QueueConfig(chunk_size=8)))
    srv, _ = create_server(config)
    srv.start()
    try:
        with LatentServeClient(srv.target, timeout=TIMEOUT) as client:
            assert client.compress(x, model="hp") == codes  # unary
            assert np.array_equal(client.reconstruct(codes), want.reconstruct(codes))
            info = client.model("hp")
            assert info.code_kind == "hyperprior"
        with LatentServeClient(srv.target, timeout=TIMEOUT, chunk_images=5) as client:
            assert client.compress(x, model="hp") == codes  # streamed, 5 images a message
        with JobsClient(srv.target, timeout=TIMEOUT) as jobs:
            job = jobs.submit_compress("hp", x)
            assert jobs.wait(job.id).state == pb.JOB_STATE_SUCCEEDED
            assert [c for _, c in jobs.fetch(job.id)] == codes
    finally:
        assert srv.stop(1).wait(30)
    blob = tmp_path / "codes.json"
    blob.write_text(json.dumps([c.hex() for c in codes]))
    script = ("import json, sys, numpy as np\n"
              "from latentserve.worker.runtime.pipeline import Pipeline\n"
              "codes = [bytes.fromhex(c) for c in json.load(open(sys.argv[2]))]\n"
              "np.save(sys.argv[3], Pipeline(sys.argv[1]).reconstruct(codes))\n")
    subprocess.run([sys.executable, "-c", script, str(repo), str(blob),
                    str(tmp_path / "out.npy")], check=True, timeout=TIMEOUT, cwd=ROOT)
    assert np.array_equal(np.load(tmp_path / "out.npy"), want.reconstruct(codes))
