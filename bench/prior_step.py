"""mnist-vqvae at batch 256, one onnxruntime thread: compress / reconstruct / sample
images/s with the prior's step graph (prior_step.onnx) vs full prior passes (the same
model with the step graph switched off, as models exported before it run), side by side.

    python bench/prior_step.py      (from the repo root)
"""
import time

import numpy as np

from latentserve.worker.codec.codes import LatentCodec
from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime
from latentserve.worker.runtime.images import read_idx
from latentserve.worker.runtime.repository import ModelRepository

cfg = EngineConfig(intra_op_threads=1)
entry = ModelRepository("models").load("mnist-vqvae:1")
images = read_idx("../shared/data/mnist/images-idx3-ubyte.gz")[-256:]
rows = []
for label in ("full passes (before)", "step graph (after)"):
    rt = ModelRuntime(entry, cfg)
    if label.startswith("full"):
        rt.prior_step = None
    codec = LatentCodec(rt)
    t = time.perf_counter()
    codes = codec.encode(rt.encode(images))
    tc = time.perf_counter() - t
    t = time.perf_counter()
    rec = rt.decode(codec.decode(codes))
    tr = time.perf_counter() - t
    t = time.perf_counter()
    s = rt.sample(256, seed=1)
    ts = time.perf_counter() - t
    k3 = sum(c[1] == 3 for c in codes)
    rows.append((label, 256 / tc, 256 / tr, 256 / ts, k3, codes, s))
    print(f"{label:22s} compress {256/tc:7.1f}/s  reconstruct {256/tr:7.1f}/s  "
          f"sample {256/ts:7.1f}/s  kind3 {k3}/256", flush=True)
a, b = rows
print(f"speed-up: compress x{b[1] / a[1]:.2f} reconstruct x{b[2] / a[2]:.2f} "
      f"sample x{b[3] / a[3]:.2f}")
print("same codes:", a[5] == b[5], " same samples:", np.array_equal(a[6], b[6]))
