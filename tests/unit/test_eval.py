"""``latentserve eval`` end to end on tiny models, and its parts on fixed inputs."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentserve.cli import main
from latentserve.errors import InvalidInput
from latentserve.eval.classic_codecs import CodecSetting, codec_settings, parse_codecs
from latentserve.eval.rd import RDPoint, measure_codec
from latentserve.eval.report import bd_rates, headline, interpolate_bytes
from latentserve.eval.samples import class_entropy_bits, save_grid, score

ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER = ROOT / "models" / "classifiers" / "mnist-classifier" / "1"


def write_idx(path: Path, images: np.ndarray) -> Path:
    n, _, h, w = images.shape
    header = b"\0\0\x08\x03" + b"".join(int(v).to_bytes(4, "big") for v in (n, h, w))
    with gzip.open(path, "wb") as f:
        f.write(header + images.tobytes())
    return path


def test_eval_on_20_images_writes_all_three_files(
        tiny_repo: Path, mnist_images: np.ndarray, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from latentserve.eval.metrics import psnr
    from latentserve.worker.runtime.pipeline import Pipeline

    # 20 "training" images, then the 20 evaluated ones (the FID's references)
    src = write_idx(tmp_path / "val-idx3-ubyte.gz", mnist_images[:40])
    images = mnist_images[20:40]
    out = tmp_path / "out"
    rc = main(["eval", "--images", str(src), "--offset", "-20", "--repo", str(tiny_repo),
               "--codecs", "jpeg,webp,png", "--samples", "30", "--classifier",
               str(CLASSIFIER), "--quiet", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("rd.json", "rd.png", "rd.md"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "rd.json").read_text())
    labels = [p["label"] for p in report["points"]]
    assert labels[:3] == ["tiny-ae:1", "tiny-vae:1", "tiny-vqvae:1"]
    assert {"jpeg q50", "webp q10", "webp-lossless", "png"} <= set(labels)
    for p in report["points"]:
        assert len(p["per_image"]["bytes"]) == 20 and p["images"] == 20
        assert p["bits_per_pixel"] == pytest.approx(p["bytes_per_image"] * 8 / 784)
        assert p["encode_images_per_s"] > 0 and p["decode_images_per_s"] > 0
        assert p["ms_ssim"] is None  # 28 x 28 is too small for MS-SSIM's five scales
    assert "MS-SSIM" not in printed
    # the model figures are exactly what the pipeline produces: whole codes, headers included
    pipe = Pipeline(tiny_repo)
    codes = pipe.compress("tiny-vae:1", images)
    vae = next(p for p in report["points"] if p["label"] == "tiny-vae:1")
    assert vae["per_image"]["bytes"] == [len(c) for c in codes]
    want = psnr(images, pipe.reconstruct(codes))
    np.testing.assert_allclose(vae["per_image"]["psnr_db"], np.round(want, 4))
    assert set(report["bd_rate_vs_webp"]) == {"ae", "vae", "vqvae"}
    # sample quality: one entry and one grid per model
    assert [s["model"] for s in report["samples"]] == ["tiny-ae:1", "tiny-vae:1", "tiny-vqvae:1"]
    for s in report["samples"]:
        assert sum(s["class_histogram"]) == 30
        assert 0 <= s["confident_share"] <= 1 and 0 <= s["class_entropy_bits"] <= np.log2(10)
        assert (out / s["grid"]).is_file()
        assert isinstance(s["fid"], float) and s["fid"] >= 0
    # the floor: the 20 images outside the evaluated range against the 20 evaluated ones
    floor = report["fid_floor"]
    assert floor["count"] == 20 and floor["reference_count"] == 20
    assert 0 <= floor["fid"] < min(s["fid"] for s in report["samples"])
    with Image.open(out / "rd.png") as png:
        assert png.format == "PNG" and png.width >= 800
    md = (out / "rd.md").read_text()
    for label in ("tiny-ae:1", "webp q10", "BD-rate", "Sample quality", "| FID |",
                  "floor: real images"):
        assert label in md and label in printed


def test_eval_on_photos_reports_ms_ssim(photo_repo: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from latentserve.eval.metrics import ms_ssim

    with Image.open(ROOT / "examples" / "photos" / "chelsea.jpg") as img:
        rgb = np.asarray(img.convert("RGB"), np.uint8)
    folder = tmp_path / "photos"
    folder.mkdir()
    crops = [rgb[:176, :200], rgb[50:250, 100:269]]  # two sizes, both over 160 px a side
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(folder / f"p{i}.png")
    out = tmp_path / "out"
    assert main(["eval", "--images", str(folder), "--repo", str(photo_repo), "--only",
                 "tiny-photo", "--codecs", "jpeg", "--no-lossless", "--quiet",
                 "-o", str(out)]) == 0
    report = json.loads((out / "rd.json").read_text())
    for p in report["points"]:
        per = p["per_image"]["ms_ssim"]
        assert len(per) == 2 and all(0 <= v <= 1 for v in per)
        assert p["ms_ssim"] == pytest.approx(np.mean(per), abs=1e-5)
    jpeg = next(p for p in report["points"] if p["label"] == "jpeg q50")
    buf = io.BytesIO()
    Image.fromarray(crops[0]).save(buf, format="JPEG", quality=50)
    with Image.open(buf) as j:
        decoded = np.asarray(j.convert("RGB"), np.uint8).transpose(2, 0, 1)
    want = ms_ssim(crops[0].transpose(2, 0, 1)[None], decoded[None])[0]
    assert jpeg["per_image"]["ms_ssim"][0] == pytest.approx(want, abs=1e-5)
    assert "| MS-SSIM |" in (out / "rd.md").read_text()
    assert "Nearest 28.7" not in (out / "rd.md").read_text()  # the MNIST goal, not a photo's
    # a second run takes the codec points of the first instead of measuring them again
    again = tmp_path / "again"
    assert main(["eval", "--images", str(folder), "--repo", str(photo_repo), "--only",
                 "tiny-photo", "--codecs", "jpeg", "--no-lossless", "--quiet",
                 "--reuse-codecs", str(out / "rd.json"), "-o", str(again)]) == 0
    second = json.loads((again / "rd.json").read_text())
    codec_points = [p for p in report["points"] if p["kind"] == "codec"]
    reused = [p for p in second["points"] if p["kind"] == "codec"]
    assert second["meta"]["reused_codecs"]["labels"] == [p["label"] for p in codec_points]
    for a, b in zip(reused, codec_points, strict=True):
        assert a["per_image"] == b["per_image"]  # rd.json's per-image values, as written
        for key in ("bits_per_pixel", "psnr_db", "ssim", "ms_ssim", "encode_images_per_s"):
            assert a[key] == pytest.approx(b[key], abs=1e-4, rel=1e-6), key  # their rounding
    assert second["bd_rate_vs"]["jpeg"]["photo"]["bd_rate_pct"] == pytest.approx(
        report["bd_rate_vs"]["jpeg"]["photo"]["bd_rate_pct"], abs=0.05)
    # ... and only on the same images
    (folder / "p1.png").unlink()
    capsys.readouterr()
    assert main(["eval", "--images", str(folder), "--only", "--codecs", "jpeg", "--quiet",
                 "--reuse-codecs", str(out / "rd.json"), "-o", str(tmp_path / "other")]) == 1
    assert "measured other images" in capsys.readouterr().err


def test_eval_codecs_only_and_bad_arguments(mnist_images: np.ndarray, tmp_path: Path) -> None:
    src = write_idx(tmp_path / "x-idx3-ubyte.gz", mnist_images[:6])
    out = tmp_path / "o"
    assert main(["eval", "--images", str(src), "--only", "--codecs", "webp", "--quiet",
                 "--limit", "4", "-o", str(out)]) == 0
    report = json.loads((out / "rd.json").read_text())
    assert report["meta"]["images"] == 4
    assert [p["label"] for p in report["points"]][-1] == "webp-lossless"
    assert main(["eval", "--images", str(src), "--only", "--codecs", "gif", "-o",
                 str(out)]) == 1
    assert main(["eval", "--images", str(src), "--only", "--codecs", "", "-o", str(out)]) == 1


def test_codec_settings_and_lossless_round_trip(mnist_images: np.ndarray) -> None:
    assert parse_codecs(" JPEG, webp ") == ["jpeg", "webp"]
    with pytest.raises(InvalidInput, match="unknown codec 'heif'"):
        parse_codecs("jpeg,heif")
    assert parse_codecs("avif") == ["avif"]
    families = {s.family for s in codec_settings(["jpeg", "webp", "png"])}
    assert families == {"jpeg", "webp", "webp-lossless", "png"}
    images = mnist_images[:5]
    for setting in (CodecSetting("png", None, True), CodecSetting("webp-lossless", None, True)):
        point = measure_codec(setting, images)
        assert point.psnr == pytest.approx(10 * np.log10(255 ** 2 / 1e-10))
        assert point.mean_ssim == pytest.approx(1.0)
    lo = measure_codec(CodecSetting("jpeg", 10, False), images)
    hi = measure_codec(CodecSetting("jpeg", 90, False), images)
    assert lo.bytes_per_image < hi.bytes_per_image and lo.mean_psnr < hi.mean_psnr


def _point(kind: str, family: str, nbytes: float, db: float) -> RDPoint:
    one = np.ones(4)
    return RDPoint(kind=kind, family=family, label=f"{family} {nbytes}", lossless=False,
                   quality=None, nbytes=one * nbytes, psnr=one * db, ssim=one * 0.9,
                   encode_s=1.0, decode_s=1.0, pixels=784)


def test_report_bd_rate_and_headline() -> None:
    # a WebP-like curve with log-bytes linear in PSNR, so every polynomial fit is exact
    def rate(db: float) -> float:
        return float(np.exp(3.5 + 0.045 * db))

    webp = [_point("codec", "webp", rate(p), p) for p in (22.6, 27.3, 28.7, 31.1, 36.1)]
    # an AE ladder at exactly half WebP's bytes, at three of WebP's PSNRs
    ae = [_point("model", "ae", rate(p) / 2, p) for p in (27.3, 28.7, 31.1)]
    far = [_point("model", "vqvae", 10, 60.0)]
    bd = bd_rates(webp + ae + far)
    assert bd["ae"]["bd_rate_pct"] == pytest.approx(-50, abs=1e-6)
    assert bd["vqvae"]["bd_rate_pct"] is None and "share no PSNR range" in bd["vqvae"]["note"]
    h = headline(webp + ae)
    assert h["nearest"]["psnr_db"] == 28.7
    assert h["nearest"]["bytes_per_image"] == pytest.approx(rate(28.7) / 2)
    assert h["smallest_at_target"]["bytes_per_image"] == pytest.approx(rate(28.7) / 2)
    assert h["webp_bytes_at_target"] == pytest.approx(rate(28.7))
    assert interpolate_bytes(webp, 50.0) is None


def test_sample_scores_and_grid(tmp_path: Path) -> None:
    assert class_entropy_bits(np.arange(100) % 10) == pytest.approx(np.log2(10))
    assert class_entropy_bits(np.zeros(50, np.int64)) == 0
    probs = np.full((4, 10), 0.01)
    probs[:, 3] = 0.91
    probs[3] = 0.1  # one uncertain sample, predicted class 0
    confident, entropy, hist, _ = score(probs)
    assert confident == 0.75 and hist[3] == 3 and hist[0] == 1
    assert entropy == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))
    imgs = np.zeros((100, 1, 28, 28), np.uint8)
    save_grid(imgs, tmp_path / "g.png", scale=1, gap=2)
    with Image.open(tmp_path / "g.png") as g:
        assert g.size == (10 * 30 + 2, 10 * 30 + 2)


def test_fid_absent_is_said_not_guessed(tmp_path: Path) -> None:
    import shutil

    from latentserve.errors import ModelIntegrityError
    from latentserve.eval.report import markdown
    from latentserve.eval.samples import Classifier, SampleQuality

    # a classifier exported before the features output: predictions yes, FID no
    old = tmp_path / "clf"
    shutil.copytree(CLASSIFIER, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["onnx"]["features"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    clf = Classifier.load(old)
    assert not clf.has_features
    assert clf.predict(np.zeros((2, 1, 28, 28), np.uint8)).shape == (2, 10)
    with pytest.raises(ModelIntegrityError, match="no features output"):
        clf.features(np.zeros((2, 1, 28, 28), np.uint8))
    manifest["onnx"]["features"] = "penultimate"  # a name the graph does not have
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="'penultimate'"):
        Classifier.load(old)
    s = SampleQuality(model="m:1", family="ae", count=5, confident_share=0.2,
                      class_entropy_bits=1.0, class_histogram=[5] + [0] * 9,
                      mean_confidence=0.5, samples_per_s=10.0)
    md = markdown([], samples=[s], meta={"fid_note": "no FID: why"})
    assert "| 1.000 | n/a |" in md and "no FID: why." in md and "floor" not in md


def test_eval_of_every_model_skips_those_that_cannot_take_the_images(
        photo_repo: Path, mnist_images: np.ndarray, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without --only, a model whose input does not fit the images (an RGB codec on grey
    digits) is skipped with its reason; named with --only, it is an error."""
    src = write_idx(tmp_path / "d-idx3-ubyte.gz", mnist_images[:4])
    out = tmp_path / "o"
    assert main(["eval", "--images", str(src), "--repo", str(photo_repo), "--codecs", "",
                 "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped: model tiny-photo:1 takes" in err and "other channel counts" in err
    report = json.loads((out / "rd.json").read_text())
    assert [p["label"] for p in report["points"]] == ["tiny-photo-grey:1"]
    assert main(["eval", "--images", str(src), "--repo", str(photo_repo), "--codecs", "",
                 "--only", "tiny-photo", "-o", str(out)]) == 1
    assert "other channel counts" in capsys.readouterr().err
