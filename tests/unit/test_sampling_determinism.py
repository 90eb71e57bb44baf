"""The sampling promise (README, docs/code-format.md "Sampling"): on one build and
provider, the same (model, seed, temperature, index) gives the same bytes whatever else
shares the batch, however the count is cut, with any thread count, in process or over
the wire. Across kernels only the weaker promise holds: the random draws are bit-exact
and the same latent decodes to pixels within one grey level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from latentserve.errors import InvalidInput
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import jobs_pb2 as jpb
from latentserve.worker.runtime.engine import (
    EngineConfig,
    canonical_temperature,
    image_rng,
    to_uint8,
)
from latentserve.worker.runtime.pipeline import Pipeline, check_temperature

MODELS = ("tiny-ae", "tiny-vae", "tiny-vqvae")
COUNT = 24
START = 3


@pytest.fixture(scope="module", params=[1, 2], ids=["1-thread", "2-threads"])
def pipeline(request: pytest.FixtureRequest, tiny_repo: Path) -> Pipeline:
    return Pipeline(tiny_repo, EngineConfig(intra_op_threads=request.param))


@pytest.mark.parametrize("model", MODELS)
def test_a_sample_does_not_depend_on_what_shares_its_batch(pipeline: Pipeline,
                                                           model: str) -> None:
    whole = pipeline.sample(model, COUNT, seed=11, temperature=0.8, start=START)
    for cut in (1, 5, 7, 11):  # batch sizes a batcher or a job's chunking could make
        parts = np.concatenate([
            pipeline.sample(model, min(cut, COUNT - at), seed=11, temperature=0.8,
                            start=START + at) for at in range(0, COUNT, cut)])
        assert np.array_equal(parts, whole), (model, cut)
    # One image alone, and inside a batch where it sits elsewhere.
    assert np.array_equal(pipeline.sample(model, 1, seed=11, temperature=0.8, start=START + 9),
                          whole[9:10]), model


@pytest.mark.parametrize("model", MODELS)
def test_thread_count_does_not_change_a_sample(tiny_repo: Path, model: str) -> None:
    one, two = (Pipeline(tiny_repo, EngineConfig(intra_op_threads=n)) for n in (1, 2))
    assert np.array_equal(one.sample(model, 16, seed=5, temperature=0.8),
                          two.sample(model, 16, seed=5, temperature=0.8)), model


def test_the_wire_temperature_and_the_callers_give_the_same_samples(pipeline: Pipeline) -> None:
    # 0.8 is not a float32: the wire carries 0.800000011920929. Scaling by the one or the
    # other moved a tiny-vae pixel by a grey level before the engine rounded both.
    wire = pb.SampleRequest(temperature=0.8).temperature
    assert wire != 0.8 and jpb.JobSpec(temperature=0.8).temperature == wire
    assert canonical_temperature(0.8) == wire == check_temperature(0.8)
    for model in MODELS:
        assert np.array_equal(pipeline.sample(model, COUNT, seed=11, temperature=0.8),
                              pipeline.sample(model, COUNT, seed=11, temperature=wire)), model


def test_a_temperature_float32_cannot_hold_is_refused(pipeline: Pipeline) -> None:
    for bad in (1e-50, 1e300, float("nan"), 0.0, -1.0):
        with pytest.raises(InvalidInput, match="temperature must be a positive number"):
            check_temperature(bad)
        with pytest.raises(InvalidInput, match="temperature"):
            pipeline.sample("tiny-vae", 2, seed=0, temperature=bad)


def test_the_random_draws_are_the_same_on_every_machine() -> None:
    # PCG64 seeded by SeedSequence([seed, index]) yields the same 53-bit doubles on any
    # CPU: the part of a sample that does not run through a network is bit-exact.
    got = [x.hex() for x in image_rng(11, 3).random(3)]
    assert got == ["0x1.edd7ccda11d8fp-1", "0x1.b2aeb86678cdcp-1", "0x1.81f3dc2bbd200p-10"]


@pytest.mark.parametrize("model", ["tiny-ae", "tiny-vae"])
def test_other_kernels_decode_within_one_grey_level(pipeline: Pipeline, tiny_repo: Path,
                                                    model: str) -> None:
    """The same latent through differently fused kernels (onnxruntime's graph rewrites
    off, as another build or provider would differ): pixels within one grey level."""
    runtime = pipeline.runtime(model)
    spec = runtime.manifest.factorized
    assert spec is not None
    rng = np.random.default_rng(0)
    normal = rng.standard_normal((64, *runtime.manifest.latent_shape))
    symbols = runtime.quantize(normal * 2)
    latent = symbols.astype(np.float32) * np.float32(spec.step)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    plain = ort.InferenceSession(str(runtime.entry.file("decoder")), sess_options=opts,
                                 providers=["CPUExecutionProvider"])
    other = to_uint8(plain.run(None, {"latent": latent})[0])
    ours = runtime.decode(symbols)
    assert np.abs(other.astype(np.int16) - ours.astype(np.int16)).max() <= 1
