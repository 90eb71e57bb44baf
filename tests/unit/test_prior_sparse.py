"""worker/codec/prior_sparse.py gives exactly the dense prior-table rule of entropy.py:
the same offsets and bit-identical float64 tables (plan_prior vs plan_offsets), the same
tables and margins (step_tables vs prior_tables), on random logits and specs, with
logits placed on and near rounding boundaries, NaN and infinite logits, and images
that no offset can code."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from latentserve.worker.codec import prior_sparse
from latentserve.worker.codec.entropy import PRIOR_OFFSETS, plan_offsets, prior_tables
from latentserve.worker.codec.prior_sparse import plan_prior, step_tables
from latentserve.worker.runtime.manifest import VQPriorSpec
from random_tables import SETTINGS


def random_spec(rng: np.random.Generator, scale: float, lut_len: int) -> VQPriorSpec:
    lut = tuple(max(1, round(65536 * math.exp(-d / scale))) for d in range(lut_len))
    return VQPriorSpec(logit_scale=scale, guard=float(rng.choice([2e-5, 1e-3, 2e-2])), lut=lut)


def random_logits(rng: np.random.Generator, shape: tuple[int, ...], spec: VQPriorSpec,
                  dtype: type) -> np.ndarray:
    """Logits of every spread, some put on a rounding boundary of some offset or within
    a guard of one, a few NaN / infinite."""
    logits = rng.standard_normal(shape) * rng.uniform(0.1, 12) + rng.uniform(-50, 50)
    on = rng.random(shape) < rng.choice([0.0, 0.01, 0.2])
    j = rng.integers(0, PRIOR_OFFSETS, shape)
    boundary = (np.floor(logits * spec.logit_scale) + 0.5 - j / PRIOR_OFFSETS) / spec.logit_scale
    boundary += rng.choice([0.0, 1.0, -1.0], shape) * rng.uniform(0, 3, shape) * spec.guard
    logits = np.where(on, boundary, logits).astype(dtype)
    if rng.random() < 0.2:
        flat = logits.reshape(-1)
        flat[rng.integers(0, flat.size, 3)] = rng.choice([np.nan, np.inf, -np.inf], 3)
    return logits


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6), positions=st.integers(1, 12),
       k=st.integers(2, 300), scale=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
       lut_len=st.integers(1, 30), f32=st.booleans())
def test_plan_prior_is_plan_offsets(seed: int, n: int, positions: int, k: int, scale: float,
                                    lut_len: int, f32: bool) -> None:
    rng = np.random.default_rng(seed)
    spec = random_spec(rng, scale, lut_len)
    logits = random_logits(rng, (n, positions, k), spec, np.float32 if f32 else np.float64)
    offsets, tables = plan_offsets(logits, spec)
    chunk = prior_sparse.PLAN_CHUNK
    try:  # chunks of 2 images: the merged plan is the one plan
        prior_sparse.PLAN_CHUNK = 2
        chunked = plan_prior(logits, spec)
        assert np.array_equal(chunked.offsets, offsets)
        assert np.array_equal(chunked.dense(), tables)
        for i in range(n):
            assert np.array_equal(chunked.tables(i), tables[i])
    finally:
        prior_sparse.PLAN_CHUNK = chunk
    plan = plan_prior(logits, spec)
    assert np.array_equal(plan.offsets, offsets)
    assert np.array_equal(plan.dense(), tables)  # bit for bit: the same float64s
    for i in range(n):
        assert np.array_equal(plan.tables(i), tables[i])


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), t=st.integers(1, 40), k=st.integers(2, 300),
       scale=st.sampled_from([0.5, 1.0, 2.0, 3.0]), lut_len=st.integers(1, 30),
       f32=st.booleans())
def test_step_tables_is_prior_tables(seed: int, t: int, k: int, scale: float, lut_len: int,
                                     f32: bool) -> None:
    rng = np.random.default_rng(seed)
    spec = random_spec(rng, scale, lut_len)
    logits = random_logits(rng, (t, k), spec, np.float32 if f32 else np.float64)
    offsets = rng.integers(0, PRIOR_OFFSETS, t)
    probs, margin = prior_tables(logits, spec, offsets)
    got_probs, got_margin = step_tables(logits, offsets, spec)
    assert np.array_equal(got_probs, probs)
    assert np.array_equal(got_margin, margin)


def test_an_image_no_offset_can_code_is_planned_as_kind_2() -> None:
    """A table with a logit on a boundary of every one of the 16 offsets (its logits
    spread over one unit of x), next to a plain image."""
    spec = VQPriorSpec(logit_scale=1.0, guard=1e-3, lut=(100, 50, 25, 12, 6, 3, 1))
    plain = np.zeros((1, 2, 20))
    plain[0, :, 0] = 3.0
    every = plain.copy()
    every[0, 0, 1:17] = 2.5 - np.arange(16) / 16  # x + j/16 = 2.5 for j = 0..15
    logits = np.concatenate([plain, every])
    offsets, tables = plan_offsets(logits, spec)
    assert offsets.tolist() == [0, -1]
    plan = plan_prior(logits, spec)
    assert plan.offsets.tolist() == [0, -1]
    assert np.array_equal(plan.dense(), tables)
