"""Memory stays bounded for big photos: tiles, not the image, size the network's memory.

A child process (its own peak RSS, VmHWM) compresses and reconstructs one 1536 x 1536
photo with a full-width photo codec (N=48, M=96, untrained: memory does not depend on
the weights) in tiles of 16 x 16 latent cells. Measured on the development machine:
the peak grows by ~200 MiB tiled and by ~950 MiB when the same image runs whole, so
the bound below (400 MiB) fails if tiling stops working, whatever the CPU. The
hyperprior model's hyper graphs run on the whole latent grid (1/256 of the pixels) and
must stay inside the same bound. The 24 MP case through a real server is bench/photo.py
big.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_models import build_photo_repo

PROBE = r"""
import sys
import numpy as np
from latentserve.worker.runtime.engine import EngineConfig
from latentserve.worker.runtime.pipeline import Pipeline

def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM")

p = Pipeline(sys.argv[1], EngineConfig(intra_op_threads=1, tile_cells=16))
model = sys.argv[2]
p.reconstruct(p.compress(model, [np.zeros((3, 16, 16), np.uint8)]))
image = np.random.default_rng(0).integers(0, 256, (3, 1536, 1536), dtype=np.uint8)
before = peak_mib()
out = p.reconstruct(p.compress(model, [image]))
assert out.shape == (1, 3, 1536, 1536), out.shape
print(peak_mib() - before)
"""
BOUND_MIB = 400


@pytest.fixture(scope="module")
def full_width_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_photo_repo(tmp_path_factory.mktemp("photo_full"), n=48, m=96)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("model", ["tiny-photo", "tiny-photo-hyper"])
def test_a_big_photo_runs_in_bounded_memory(full_width_repo: Path, model: str) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, str(full_width_repo), model],
                         capture_output=True, text=True, timeout=300, check=True)
    growth = float(out.stdout.strip().splitlines()[-1])
    assert growth < BOUND_MIB, f"peak RSS grew by {growth:.0f} MiB (bound {BOUND_MIB})"
