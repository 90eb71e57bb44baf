"""``latentserve models``: lists a repository as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentserve.cli import main

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_repo"


def test_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--repo", str(GOLDEN)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "FAMILY", "CODE"]
    assert [ln.split()[:3] for ln in lines[1:]] == [["golden-ae:1", "ae", "factorized"],
                                                    ["golden-vqpar:1", "vqvae", "vq_parallel"],
                                                    ["golden-vqvae:1", "vqvae", "vq_prior"]]


def test_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json", "--repo", str(GOLDEN)]) == 0
    doc = json.loads(capsys.readouterr().out)
    vq = next(m for m in doc["models"] if m["ref"] == "golden-vqvae:1")
    assert vq["latent_shape"] == [7, 7]
    assert vq["fingerprint"] == vq["manifest_sha256"][:4]


def test_models_env_default(monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LATENTSERVE_MODELS", str(GOLDEN))
    assert main(["models", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["models"]) == 3


def test_models_missing_repo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--repo", str(tmp_path / "nope")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert main(["models", "--repo", str(tmp_path)]) == 0
    assert "no models" in capsys.readouterr().out
