"""worker/runtime/pipeline.py: compress / reconstruct / sample / identify over real ONNX models."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from latentserve.errors import (
    CodeError,
    CodeMismatch,
    CorruptCode,
    InvalidInput,
    ModelIntegrityError,
    ModelNotFound,
)
from latentserve.worker.codec.codes import pack
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.pipeline import Pipeline

# The machine's cores are shared: one onnxruntime thread per session in tests.
ONE_THREAD = EngineConfig(intra_op_threads=1)
GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_repo"


@pytest.fixture(scope="module")
def tiny(tiny_repo: Path) -> Pipeline:
    return Pipeline(tiny_repo, ONE_THREAD)


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(GOLDEN, tmp_path / "repo"))


def add_version(repo: Path, name: str, version: int, *, match_fingerprint: bool = False) -> str:
    """Copy ``name``'s version 1 as ``version`` (registry updated); optionally search a
    nonce so its manifest digest shares the first 2 bytes with version 1's."""
    src = json.loads((repo / name / "1" / "manifest.json").read_text())
    want = hashlib.sha256((repo / name / "1" / "manifest.json").read_bytes()).digest()[:2]
    dst = repo / name / str(version)
    shutil.copytree(repo / name / "1", dst)
    src["version"] = version
    src["training"] = {"nonce": "NONCE"}
    head, tail = (json.dumps(src, indent=1, sort_keys=True) + "\n").encode().split(b'"NONCE"')
    prefix = hashlib.sha256(head)
    for nonce in range(1 << 22):  # ~65,536 tries on average
        h = prefix.copy()
        h.update(b"%d" % nonce + tail)
        if not match_fingerprint or h.digest()[:2] == want:
            break
    data = head + b"%d" % nonce + tail
    (dst / "manifest.json").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    reg = json.loads((repo / "registry.json").read_text())
    reg["models"].append({"name": name, "version": version, "manifest_sha256": digest})
    (repo / "registry.json").write_text(json.dumps(reg))
    return digest


def test_models_lists_the_repository(tiny: Pipeline) -> None:
    assert [e.manifest.ref for e in tiny.models()] == ["tiny-ae:1", "tiny-vae:1", "tiny-vqvae:1"]


@pytest.mark.parametrize("name", ["tiny-ae", "tiny-vae", "tiny-vqvae"])
def test_compress_reconstruct(tiny: Pipeline, mnist_images: np.ndarray, name: str) -> None:
    images = mnist_images[:32]
    codes = tiny.compress(name, images)
    assert len(codes) == 32 and all(isinstance(c, bytes) for c in codes)
    runtime = tiny.runtime(name)
    want = runtime.decode(runtime.encode(images))
    assert np.array_equal(tiny.reconstruct(codes), want)
    assert np.array_equal(tiny.reconstruct(codes, ref=f"{name}:1"), want)
    assert tiny.identify(codes[0]).manifest.ref == f"{name}:1"


def test_compress_with_a_forced_kind(tiny: Pipeline, mnist_images: np.ndarray) -> None:
    images = mnist_images[:8]
    codes = tiny.compress("tiny-vqvae", images, kind="vq_static")
    assert {c[1] for c in codes} == {2}
    assert np.array_equal(tiny.reconstruct(codes),
                          tiny.reconstruct(tiny.compress("tiny-vqvae", images)))
    with pytest.raises(InvalidInput, match="cannot write code kind 'vq_static'"):
        tiny.compress("tiny-ae", images, kind="vq_static")


def test_codes_of_several_models_are_grouped(tiny: Pipeline, mnist_images: np.ndarray) -> None:
    images = mnist_images[:12]
    per_model = {n: tiny.compress(n, images) for n in ("tiny-ae", "tiny-vae", "tiny-vqvae")}
    names = ["tiny-ae", "tiny-vae", "tiny-vqvae"] * 4
    mixed = [per_model[n][i] for i, n in enumerate(names)]
    out = tiny.reconstruct(mixed)
    for i, n in enumerate(names):
        assert np.array_equal(out[i], tiny.reconstruct([per_model[n][i]])[0])


def test_ref_of_another_model_is_refused(tiny: Pipeline, mnist_images: np.ndarray) -> None:
    codes = tiny.compress("tiny-ae", mnist_images[:2])
    with pytest.raises(CodeMismatch, match=r"made by tiny-ae:1 \(manifest sha256 .*not by the "
                                           r"requested tiny-vae:1"):
        tiny.reconstruct(codes, ref="tiny-vae")
    with pytest.raises(ModelNotFound):
        tiny.reconstruct(codes, ref="no-such-model")


def test_reconstruct_each_reports_bad_codes_by_index(tiny: Pipeline,
                                                     mnist_images: np.ndarray) -> None:
    codes = tiny.compress("tiny-vqvae", mnist_images[:6])
    codes[2] = codes[2][:5]
    codes[4] = codes[4][:-1] + bytes([codes[4][-1] ^ 0x40])
    results = tiny.reconstruct_each(codes)
    assert [type(r).__name__ for r in results] == ["ndarray", "ndarray", "CorruptCode",
                                                   "ndarray", "CorruptCode", "ndarray"]
    with pytest.raises(CorruptCode, match="code 2 of 6: .*truncated"):
        tiny.reconstruct(codes)


def test_empty_reconstruct(tiny: Pipeline) -> None:
    assert tiny.reconstruct([], ref="tiny-ae").shape == (0, 1, 28, 28)
    with pytest.raises(InvalidInput):
        tiny.reconstruct([])


def test_code_of_a_deleted_version_names_it(repo_copy: Path) -> None:
    add_version(repo_copy, "golden-vqvae", 2)
    pipe = Pipeline(repo_copy, ONE_THREAD)
    code = pipe.compress("golden-vqvae:1", np.zeros((1, 1, 28, 28), np.uint8))[0]
    shutil.rmtree(repo_copy / "golden-vqvae" / "1")
    pipe = Pipeline(repo_copy, ONE_THREAD)
    with pytest.raises(CodeMismatch, match=r"made by golden-vqvae:1 \(manifest sha256 [0-9a-f]{12}"
                                           r".*the repository has golden-vqvae:2"):
        pipe.reconstruct([code])


def test_code_of_an_unknown_model(repo_copy: Path) -> None:
    code = pack(hashlib.sha256(b"elsewhere").hexdigest(), 2, b"\x05")
    with pytest.raises(CodeMismatch, match="neither .* nor its registry knows .*available: "
                                           "golden-ae:1, golden-vqpar:1, golden-vqvae:1"):
        Pipeline(repo_copy, ONE_THREAD).identify(code)


def test_shared_fingerprint_is_resolved_by_the_checksum(repo_copy: Path) -> None:
    add_version(repo_copy, "golden-vqvae", 2, match_fingerprint=True)
    pipe = Pipeline(repo_copy, ONE_THREAD)
    v1, v2 = (pipe.codec(f"golden-vqvae:{v}").manifest for v in (1, 2))
    assert v1.fingerprint == v2.fingerprint and v1.digest != v2.digest
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    c1 = pipe.compress("golden-vqvae:1", images)
    c2 = pipe.compress("golden-vqvae:2", images)
    assert pipe.identify(c1[0]).manifest.version == 1
    assert pipe.identify(c2[0]).manifest.version == 2
    assert np.array_equal(pipe.reconstruct(c1 + c2)[:4], pipe.reconstruct(c2)[:4])
    with pytest.raises(CodeMismatch, match="made by golden-vqvae:2"):
        pipe.reconstruct(c2, ref="golden-vqvae:1")


def test_runtime_is_cached_and_verified_once(repo_copy: Path) -> None:
    pipe = Pipeline(repo_copy, ONE_THREAD)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(pipe.runtime("golden-ae")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(r is got[0] for r in got)
    (repo_copy / "golden-ae" / "1" / "decoder.onnx").write_bytes(b"tampered")
    assert pipe.runtime("golden-ae:1") is got[0]  # verified once, at load
    with pytest.raises(ModelIntegrityError, match="decoder.onnx has sha256"):
        Pipeline(repo_copy, ONE_THREAD).runtime("golden-ae")


def test_concurrent_compress_is_consistent(tiny: Pipeline, mnist_images: np.ndarray) -> None:
    images = mnist_images[:16]
    want = tiny.compress("tiny-vqvae", images)
    out: list[list[bytes]] = []
    threads = [threading.Thread(target=lambda: out.append(tiny.compress("tiny-vqvae", images)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [want] * 4


def test_sample_is_reproducible_across_chunking(tiny: Pipeline) -> None:
    whole = tiny.sample("tiny-vqvae", 6, seed=3)
    parts = np.concatenate([tiny.sample("tiny-vqvae", 2, seed=3, start=s) for s in (0, 2, 4)])
    assert whole.shape == (6, 1, 28, 28) and whole.dtype == np.uint8
    assert np.array_equal(whole, parts)


def test_errors_are_code_errors(tiny: Pipeline) -> None:
    for bad in (b"", b"\xa1", b"garbage-garbage"):
        (result,) = tiny.reconstruct_each([bad])
        assert isinstance(result, CodeError)


def test_models_follow_the_repository_on_disk(repo_copy: Path) -> None:
    """Manifests are cached by their stat; new, changed and deleted models still show."""
    pipe = Pipeline(repo_copy, ONE_THREAD)
    before = {e.manifest.ref: e.manifest.digest for e in pipe.models()}
    digest2 = add_version(repo_copy, "golden-vqvae", 2)
    now = {e.manifest.ref: e.manifest.digest for e in pipe.models()}
    assert now == {**before, "golden-vqvae:2": digest2}
    path = repo_copy / "golden-ae" / "1" / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"quality": {}', b'"quality": {"x": 1}'))
    changed = {e.manifest.ref: e.manifest.digest for e in pipe.models()}
    assert changed["golden-ae:1"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert changed["golden-ae:1"] != before["golden-ae:1"]
    shutil.rmtree(repo_copy / "golden-vqvae" / "1")
    assert [e.manifest.ref for e in pipe.models()] == ["golden-ae:1", "golden-vqpar:1",
                                                       "golden-vqvae:2"]
