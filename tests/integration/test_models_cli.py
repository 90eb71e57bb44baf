"""``latentserve models --target``: the server's view of its models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentserve.cli import main
from latentserve.service.jobs.settings import JobSettings
from latentserve.service.server.assemble import create_server
from latentserve.service.server.config import ServiceConfig


def test_models_from_a_server_match_the_repository(
        tiny_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, port = create_server(ServiceConfig(jobs=JobSettings.off(),
                                               host="127.0.0.1", port=0, metrics_port=None,
                                               models=tiny_repo, grace_s=1.0))
    server.start()
    try:
        assert main(["models", "--json", "--target", f"127.0.0.1:{port}"]) == 0
        remote = json.loads(capsys.readouterr().out)["models"]
        assert main(["models", "--target", f"127.0.0.1:{port}"]) == 0
        table = capsys.readouterr().out
    finally:
        server.stop(1.0).wait()
    assert main(["models", "--json", "--repo", str(tiny_repo)]) == 0
    local = json.loads(capsys.readouterr().out)["models"]
    assert [m["ref"] for m in remote] == [m["ref"] for m in local] == [
        "tiny-ae:1", "tiny-vae:1", "tiny-vqvae:1"]
    assert [m["manifest_sha256"] for m in remote] == [m["manifest_sha256"] for m in local]
    assert all(m["provider"] in ("", "CPUExecutionProvider") for m in remote)
    assert "tiny-vqvae:1" in table


def test_models_from_an_unreachable_server_fail_clearly(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--target", "127.0.0.1:1"]) == 1
    assert "127.0.0.1:1" in capsys.readouterr().err
