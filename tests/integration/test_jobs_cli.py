"""``latentserve job ...`` against a real server, Redis and worker."""

from __future__ import annotations

import json

import pytest

from latentserve.cli import main
from latentserve.worker.codec.container import pack_container
from latentserve.worker.runtime.images import encode_png

pytestmark = pytest.mark.queue


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_watch_fetch_resume_list_cancel(jobs_server, make_worker, tiny_pipeline,
                                               mnist_images, tmp_path, capsys):
    target = ("--target", jobs_server.target)
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, im in enumerate(mnist_images[:20]):
        (folder / f"{i:03d}.png").write_bytes(encode_png(im))
    code, out, err = run(capsys, "job", "submit", "compress", str(folder), "--model", "tiny-ae",
                         "--chunk-size", "8", *target)
    assert code == 0 and "20 items in 3 chunks of 8" in err
    job_id = out.strip()
    make_worker(queue=jobs_server.queue).run()
    code, _, err = run(capsys, "job", "watch", job_id, *target)
    assert code == 0 and f"job {job_id}: succeeded" in err

    out_dir = tmp_path / "codes"
    assert run(capsys, "job", "fetch", job_id, "-o", str(out_dir), *target)[0] == 0
    want = tiny_pipeline.compress("tiny-ae", mnist_images[:20])
    files = sorted(out_dir.glob("*.lsc"))
    assert [f.read_bytes() for f in files] == want
    for f in files[17:]:  # an interrupted fetch: it resumes after what is there
        f.unlink()
    code, _, err = run(capsys, "job", "fetch", job_id, "-o", str(out_dir), *target)
    assert "wrote 3 files" in err and "from index 17" in err
    assert [f.read_bytes() for f in sorted(out_dir.glob("*.lsc"))] == want

    # Reconstruct from a container of the fetched codes; sample; cancel one; list.
    container = tmp_path / "codes.lscb"
    container.write_bytes(pack_container(want))
    code, out, _ = run(capsys, "job", "submit", "reconstruct", str(container), *target)
    rec_id = out.strip()
    code, out, _ = run(capsys, "job", "submit", "sample", "--model", "tiny-vae", "-n", "5",
                       "--seed", "3", *target)
    smp_id = out.strip()
    code, out, _ = run(capsys, "job", "submit", "sample", "--model", "tiny-vae", "-n", "5",
                       *target)
    doomed = out.strip()
    code, out, _ = run(capsys, "job", "cancel", doomed, *target)
    assert code == 0 and "cancelled" in out
    make_worker(queue=jobs_server.queue).run()
    assert run(capsys, "job", "fetch", rec_id, "-o", str(tmp_path / "rec"), *target)[0] == 0
    recon = tiny_pipeline.reconstruct(want)
    assert [p.read_bytes() for p in sorted((tmp_path / "rec").glob("*.png"))] == \
        [encode_png(im) for im in recon]
    assert run(capsys, "job", "fetch", smp_id, "-o", str(tmp_path / "smp"), *target)[0] == 0
    assert len(list((tmp_path / "smp").glob("*.png"))) == 5
    code, out, _ = run(capsys, "job", "list", "--json", *target)
    listed = {j["id"]: j["state"] for j in json.loads(out)}
    assert listed == {job_id: "succeeded", rec_id: "succeeded", smp_id: "succeeded",
                      doomed: "cancelled"}
    code, out, _ = run(capsys, "job", "list", "--state", "cancelled", *target)
    assert doomed in out and job_id not in out
    code, out, _ = run(capsys, "job", "get", smp_id, *target)
    assert json.loads(out)["items_done"] == 5


def test_errors_are_one_line_and_exit_1(jobs_server, capsys):
    code, _, err = run(capsys, "job", "get", "0" * 32, "--target", jobs_server.target)
    assert code == 1 and "NOT_FOUND: no job 000" in err
    code, _, err = run(capsys, "job", "submit", "sample", "--model", "tiny-ae", "-n", "0",
                       "--target", jobs_server.target)
    assert code == 1 and "at least one item" in err
