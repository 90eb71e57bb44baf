"""After every fuzz case (this module runs last): the same server still answers good
requests exactly as the in-process Pipeline does, and its job queue still works."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentserve.service.wire import decode_reply_image, raw_batch
from latentserve.v1 import inference_pb2 as pb
from latentserve.v1 import inference_pb2_grpc as pb_grpc
from latentserve.v1 import jobs_pb2 as jpb
from latentserve.v1 import jobs_pb2_grpc as jgrpc
from latentserve.worker.runtime.images import encode_png

from .fuzz_cases import MODELS
from .fuzz_client import STATS, WEIGHTS

TIMEOUT = 30.0


def test_good_requests_get_the_pipelines_answers(channel: grpc.Channel, tiny_pipeline: Any,
                                                 images: np.ndarray) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == \
        health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.InferenceStub(channel)
    batch = images[:8]
    for model in MODELS:
        want = tiny_pipeline.compress(model, batch)
        codes = list(stub.Compress(pb.CompressRequest(model=model, batch=raw_batch(batch)),
                                   timeout=TIMEOUT).codes)
        assert codes == want, model
        pngs = [pb.Image(encoded=encode_png(im)) for im in batch]
        assert list(stub.Compress(pb.CompressRequest(model=model, images=pngs),
                                  timeout=TIMEOUT).codes) == want, model
        pixels = tiny_pipeline.reconstruct(want)
        for fmt in (pb.IMAGE_FORMAT_RAW, pb.IMAGE_FORMAT_PNG):
            reply = stub.Reconstruct(pb.ReconstructRequest(codes=codes, format=fmt),
                                     timeout=TIMEOUT)
            got = np.stack([decode_reply_image(im) for im in reply.images])
            assert np.array_equal(got, pixels), (model, fmt)
            assert list(reply.models) == [f"{model}:1"] * len(codes)
        sample = stub.Sample(pb.SampleRequest(model=model, count=4, seed=11, temperature=0.8,
                                              start=3, format=pb.IMAGE_FORMAT_RAW),
                             timeout=TIMEOUT)
        got = np.stack([decode_reply_image(im) for im in sample.images])
        assert np.array_equal(got, tiny_pipeline.sample(model, 4, seed=11, temperature=0.8,
                                                        start=3)), model


def test_the_job_queue_still_works(channel: grpc.Channel, idle_queue: None,
                                   tiny_pipeline: Any, images: np.ndarray) -> None:
    stub = jgrpc.JobsStub(channel)
    spec = jpb.JobSpec(kind=jpb.JOB_KIND_COMPRESS, model="tiny-vqvae", chunk_size=4)
    pngs = [pb.Image(encoded=encode_png(im)) for im in images[:10]]
    messages = [jpb.SubmitJobRequest(spec=spec)] + [
        jpb.SubmitJobRequest(items=jpb.JobItems(images=pngs[i:i + 5])) for i in (0, 5)]
    job = stub.SubmitJob(iter(messages), timeout=TIMEOUT)
    *_, last = stub.WatchJob(jpb.WatchJobRequest(id=job.id), timeout=120)
    assert last.state == jpb.JOB_STATE_SUCCEEDED, last
    codes = [c for r in stub.FetchResults(jpb.FetchResultsRequest(id=job.id), timeout=TIMEOUT)
             for c in r.codes]
    assert codes == tiny_pipeline.compress("tiny-vqvae", images[:10])


def test_every_category_sent_its_share(pytestconfig: pytest.Config,
                                       fuzz_budget: Callable[[str], int]) -> None:
    stats = pytestconfig.stash[STATS]
    missing = sorted(set(WEIGHTS) - set(stats.by_category))
    if missing:
        pytest.skip(f"not every fuzz category ran (deselected: {', '.join(missing)})")
    short = {c: sum(stats.by_category[c].values()) for c in WEIGHTS
             if sum(stats.by_category[c].values()) < fuzz_budget(c)}
    assert not short, f"categories that sent fewer requests than their share: {short}"
    assert stats.tried >= sum(fuzz_budget(c) for c in WEIGHTS)
