"""One bad item must not fail a whole bulk job.

Through a real gRPC server and a real worker: by default (PER_ITEM) a job with bad
items among good ones SUCCEEDS, counts ``items_failed``, and FetchResults gives every
good result (byte-equal to the pipeline's) and, in each bad item's slot, the status code
and message the unary RPC gives for that item alone. FAIL_FAST keeps the old behaviour.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from latentserve import errors as E
from latentserve.cli import main
from latentserve.service.client.jobs import ItemFailed, JobsClient, state_name
from latentserve.service.wire import raw_image
from latentserve.v1 import inference_pb2 as ipb
from latentserve.v1 import inference_pb2_grpc as ipb_grpc
from latentserve.v1 import jobs_pb2 as pb
from latentserve.v1 import jobs_pb2_grpc as pb_grpc
from latentserve.worker.runtime.images import encode_png

pytestmark = pytest.mark.queue
NOBODYS_CODE = b"\xa1\x01" + bytes(12)  # a v1 header on bytes no model made


def unary_status(target: str, method: str, request: object) -> tuple[str, str]:
    """(status code name, message) of a unary Inference call that must fail."""
    with grpc.insecure_channel(target) as channel:
        call = getattr(ipb_grpc.InferenceStub(channel), method)
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
    return info.value.code().name, info.value.details()


def flipped(code: bytes) -> bytes:
    return code[:-1] + bytes([code[-1] ^ 0xFF])  # its checksum no longer matches


@pytest.fixture
def client(jobs_server):
    with JobsClient(jobs_server.target, timeout=30, batch=5) as c:
        yield c


def test_bad_codes_fail_only_their_items(client, jobs_server, make_worker, tiny_pipeline,
                                         mnist_images, tmp_path, capsys):
    codes = tiny_pipeline.compress("tiny-vae", mnist_images[:40])
    # A checksum only a worker checks, a truncation SubmitJob sees, a code of no model
    # here, over three chunks of 16.
    bad = {3: flipped(codes[3]), 17: codes[17][:3], 33: NOBODYS_CODE}
    sent = [bad.get(i, c) for i, c in enumerate(codes)]
    job = client.submit_reconstruct(sent)
    assert job.on_item_error == pb.ON_ITEM_ERROR_PER_ITEM
    make_worker(queue=jobs_server.queue).run()

    done = client.get(job.id)
    assert (state_name(done.state), done.items_done, done.items_failed, done.error) == \
        ("succeeded", 40, 3, "")
    got = dict(client.fetch(job.id))
    assert sorted(got) == list(range(40))
    want = tiny_pipeline.reconstruct([c for i, c in enumerate(codes) if i not in bad])
    good = [got[i] for i in range(40) if i not in bad]
    assert good == [encode_png(im) for im in want]
    for i, code in bad.items():
        status = unary_status(jobs_server.target, "Reconstruct",
                              ipb.ReconstructRequest(codes=[code]))
        assert got[i] == ItemFailed(i, *status), (i, got[i], status)
    assert [got[i].code for i in sorted(bad)] == ["DATA_LOSS", "DATA_LOSS",
                                                  "FAILED_PRECONDITION"]
    # On the wire: the failed slot is there, empty, and the message lists it.
    [msg] = [m for m in client.fetch_messages(job.id, 16) if m.start == 16]
    assert msg.images[1] == ipb.Image() and [e.index for e in msg.errors] == [17]

    # The CLI writes the good results, an .error.json per failed item, exits 3; resumes.
    target = ("--target", jobs_server.target)
    out = tmp_path / "images"
    assert main(["job", "fetch", job.id, "-o", str(out), *target]) == 3
    err = capsys.readouterr().err
    assert f"item 17: DATA_LOSS: {got[17].message}" in err and "3 items failed" in err
    assert sorted(p.name for p in out.glob("*.error.json")) == \
        ["0000003.error.json", "0000017.error.json", "0000033.error.json"]
    assert json.loads((out / "0000033.error.json").read_text()) == \
        {"index": 33, "code": got[33].code, "message": got[33].message}
    assert [p.read_bytes() for p in sorted(out.glob("*.png"))] == good
    for p in sorted(out.iterdir())[30:]:
        p.unlink()
    assert main(["job", "fetch", job.id, "-o", str(out), *target]) == 3
    assert "wrote 9 files" in capsys.readouterr().err and len(list(out.iterdir())) == 40


def test_bad_images_fail_only_their_items(client, jobs_server, make_worker, tiny_pipeline,
                                          mnist_images):
    images = mnist_images[:20]
    bad = {2: b"not an image at all", 19: np.zeros((1, 20, 20), np.uint8)}
    sent = [bad.get(i, im) for i, im in enumerate(images)]
    job = client.submit_compress("tiny-ae", sent)
    make_worker(queue=jobs_server.queue).run()

    done = client.get(job.id)
    assert (state_name(done.state), done.items_done, done.items_failed) == ("succeeded", 20, 2)
    got = dict(client.fetch(job.id))
    want = tiny_pipeline.compress("tiny-ae", images[[i for i in range(20) if i not in bad]])
    assert [got[i] for i in range(20) if i not in bad] == want
    for i, item in bad.items():
        msg = raw_image(item) if isinstance(item, np.ndarray) else ipb.Image(encoded=item)
        code, text = unary_status(jobs_server.target, "Compress",
                                  ipb.CompressRequest(model="tiny-ae", images=[msg]))
        # The unary names the image by its place in the request, the job by its index.
        assert got[i] == ItemFailed(i, code, text.replace("images[0]", f"image {i}"))
        assert code == "INVALID_ARGUMENT"


def test_fail_fast_keeps_the_whole_job_failing(client, jobs_server, make_worker, tiny_pipeline,
                                               mnist_images):
    codes = tiny_pipeline.compress("tiny-vae", mnist_images[:20])
    sent = [flipped(c) if i == 5 else c for i, c in enumerate(codes)]
    job = client.submit_reconstruct(sent, on_item_error="fail_fast")
    assert job.on_item_error == pb.ON_ITEM_ERROR_FAIL_FAST
    stats = make_worker(queue=jobs_server.queue).run()
    failed = client.get(job.id)
    assert state_name(failed.state) == "failed" and stats.dead_lettered == 1
    assert "chunk 0 (items 0-15): CorruptCode" in failed.error and failed.items_failed == 0
    with pytest.raises(E.JobStateError, match="were not produced"):
        list(client.fetch(job.id))
    # Bad on arrival: refused before any job exists, as before.
    with pytest.raises(E.CorruptCode, match="code 1: .*truncated"):
        client.submit_reconstruct([codes[0], codes[0][:3]], on_item_error="fail_fast")
    with pytest.raises(E.InvalidInput, match="image 1 is not a readable"):
        client.submit_compress("tiny-ae", [mnist_images[0], b"nope"], on_item_error="fail_fast")
    spec = pb.JobSpec(kind=pb.JOB_KIND_SAMPLE, model="tiny-ae", count=1, on_item_error=7)
    with (grpc.insecure_channel(jobs_server.target) as channel,
          pytest.raises(grpc.RpcError) as refused):
        pb_grpc.JobsStub(channel).SubmitJob(iter([pb.SubmitJobRequest(spec=spec)]), timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "on_item_error 7 is not one of" in refused.value.details()
    assert [j.id for j in client.list()] == [job.id]
