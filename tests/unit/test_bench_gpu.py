"""bench/gpu.py: importable without CUDA, says so, and its steps run (CPU in CUDA's place)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_why_and_measures_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    available, reason = bench.cuda_available()
    if available:
        pytest.skip("this machine has CUDA; the no-GPU message does not apply")
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA here, nothing measured" in out and "CUDAExecutionProvider" in out


@pytest.mark.parametrize("model", ["tiny-ae", pytest.param("tiny-vqvae", marks=pytest.mark.slow)])
def test_dry_run_exercises_every_step(tiny_repo: Path, tmp_path: Path, model: str) -> None:
    bench = load_bench()
    out = tmp_path / "gpu.json"
    rc = bench.main(["--dry-run-cpu", "--repo", str(tiny_repo), "--model", model,
                     "--batches", "16,40", "--repeats", "1", "--cpu-threads", "1", "--codes", "40",
                     "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    # two CPU sessions agree exactly, so every parity figure is zero
    assert report["parity"]["symbol_mismatches"] == 0
    assert report["parity"]["decoder_max_abs_diff"] == 0
    cross = report["cross_decode"]
    assert cross["codes"] == 40 and cross["identical_codes_both_ways"]
    assert cross["cuda_to_cpu"]["symbol_mismatches"] == 0
    assert [r["batch"] for r in report["throughput"]["ort-cpu"]] == [16, 40]
    for rows in report["throughput"].values():
        assert all(r["encode_code_ips"] > 0 and r["decode_ips"] > 0 for r in rows)
