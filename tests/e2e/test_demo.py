"""``latentserve demo``, the README's run command, as a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from latentserve.worker.runtime.images import encode_png

TIMEOUT = 240


def test_demo_serves_compresses_reconstructs_samples_and_exits_zero(
        tiny_repo: Path, mnist_images: np.ndarray, tmp_path: Path) -> None:
    examples = tmp_path / "digits"
    examples.mkdir()
    for i, im in enumerate(mnist_images[:12]):
        (examples / f"val-{i:04d}.png").write_bytes(encode_png(im))
    out = tmp_path / "demo-out"
    done = subprocess.run(
        [sys.executable, "-m", "latentserve.cli", "demo", "--models", str(tiny_repo),
         "--examples", str(examples), "-o", str(out)],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("MODEL"))
    assert lines[header].split()[:4] == ["MODEL", "FAMILY", "BYTES/IMAGE", "PSNR"]
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[0] for r in rows] == ["tiny-ae:1", "tiny-vae:1", "tiny-vqvae:1"]
    for r in rows:
        bytes_per_image, psnr, per_s = float(r[2]), float(r[3]), float(r[4])
        assert 8 < bytes_per_image < 784 and psnr > 0 and per_s > 0
    # The queue part: a compress job and a sample job through the embedded Valkey.
    jobs = {line.split()[1]: line for line in lines if line.startswith("job ")}
    assert set(jobs) == {"compress", "sample"}, done.stdout
    assert all(" 256 items in " in line for line in jobs.values()), done.stdout
    for name in ("tiny-ae-v1", "tiny-vae-v1", "tiny-vqvae-v1"):
        with Image.open(out / f"{name}-reconstructions.png") as g:
            assert g.size == (12 * 30 + 2, 2 * 30 + 2)  # originals above reconstructions
        with Image.open(out / f"{name}-samples.png") as g:
            assert g.size == (16 * 30 + 2, 30 + 2)
