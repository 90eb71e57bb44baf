"""Codes written in format v1 by the checked-in golden models still decode, bit for bit.

The fixture (tests/fixtures/golden_repo, golden_codes.json) is regenerated only with
``LATENTSERVE_REGEN_GOLDEN=1`` (then review the diff: a changed code means the format
or the coder changed, and old codes in the wild would stop decoding).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from latentserve.errors import CodeMismatch
from latentserve.worker.codec.codes import FORMAT_VERSION, VQ_PARALLEL, VQ_PRIOR, VQ_STATIC
from latentserve.worker.codec.lockstep import MIN_BATCH as LOCKSTEP_MIN_BATCH
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.pipeline import Pipeline

# The machine's cores are shared: one onnxruntime thread per session in tests.
ONE_THREAD = EngineConfig(intra_op_threads=1)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load_golden_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_golden", FIXTURES / "make_golden.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden() -> dict:  # type: ignore[type-arg]
    if os.environ.get("LATENTSERVE_REGEN_GOLDEN") == "1":
        make = load_golden_module()
        make.build_repo()
        make.write_codes()
    return json.loads((FIXTURES / "golden_codes.json").read_text())


def test_golden_codes_cover_every_kind(golden: dict) -> None:  # type: ignore[type-arg]
    assert golden["format_version"] == FORMAT_VERSION == 1
    assert {c["kind"] for c in golden["codes"]} == {1, VQ_STATIC, VQ_PRIOR, VQ_PARALLEL}
    # Kind-3 and kind-4 codes with a rounding offset other than 0 are among them.
    pipe = Pipeline(FIXTURES / "golden_repo", ONE_THREAD)
    for ref, kind in (("golden-vqvae:1", VQ_PRIOR), ("golden-vqpar:1", VQ_PARALLEL)):
        offsets, _ = pipe.codec(ref).prior_plan(np.array([c["symbols"] for c in golden["codes"]
                                                          if c["kind"] == kind]))
        assert offsets.min() == 0 and offsets.max() > 0, ref


def test_golden_codes_decode_to_their_symbols_and_images(golden: dict) -> None:  # type: ignore[type-arg]
    pipe = Pipeline(FIXTURES / "golden_repo", ONE_THREAD)
    codes = [bytes.fromhex(c["code"]) for c in golden["codes"]]
    for entry, code in zip(golden["codes"], codes, strict=True):
        assert pipe.identify(code).manifest.ref == entry["model"]
        symbols = pipe.codec(entry["model"]).decode([code])[0]
        assert symbols.tolist() == entry["symbols"]
    # All at once: codes of two models in one call, grouped by model.
    images = pipe.reconstruct(codes)
    want = np.stack([np.frombuffer(bytes.fromhex(c["image"]), np.uint8).reshape(1, 28, 28)
                     for c in golden["codes"]])
    # Symbols are exact; pixels may move by one rounding step across onnxruntime builds.
    assert np.abs(images.astype(int) - want).max() <= 1


def test_golden_encoder_still_writes_the_same_bytes(golden: dict) -> None:  # type: ignore[type-arg]
    """Same symbols -> same code: the coder (constriction, table quantisation) did not change."""
    pipe = Pipeline(FIXTURES / "golden_repo", ONE_THREAD)
    for entry in golden["codes"]:
        codec = pipe.codec(entry["model"])
        kind = "vq_static" if entry["kind"] == VQ_STATIC else None
        symbols = np.array([entry["symbols"]], np.int32)
        assert codec.encode(symbols, kind=kind)[0].hex() == entry["code"]


def test_code_of_a_deleted_model_names_it() -> None:
    """golden-gone:1 is only in registry.json: its codes are refused by name."""
    from latentserve.worker.codec.codes import pack

    make = load_golden_module()
    code = pack(make.GONE["manifest_sha256"], VQ_STATIC, b"\x01\x02")
    pipe = Pipeline(FIXTURES / "golden_repo", ONE_THREAD)
    with pytest.raises(CodeMismatch, match="made by golden-gone:1 .*no model named 'golden-gone'"):
        pipe.identify(code)


def test_golden_batch_encoders_write_the_same_bytes(golden: dict) -> None:  # type: ignore[type-arg]
    """The batch paths (kind 2's lockstep coder, the vectorised cut) at a batch size that
    takes them: every golden code of kinds 1 and 2, repeated, comes back byte for byte."""
    pipe = Pipeline(FIXTURES / "golden_repo", ONE_THREAD)
    for model in sorted({c["model"] for c in golden["codes"]}):
        entries = [c for c in golden["codes"]
                   if c["model"] == model and c["kind"] in (1, VQ_STATIC)]
        if not entries:
            continue
        reps = -(-LOCKSTEP_MIN_BATCH * 2 // len(entries))
        symbols = np.array([c["symbols"] for c in entries] * reps, np.int32)
        kind = "vq_static" if entries[0]["kind"] == VQ_STATIC else None
        got = pipe.codec(model).encode(symbols, kind=kind)
        assert [g.hex() for g in got] == [c["code"] for c in entries] * reps, model
