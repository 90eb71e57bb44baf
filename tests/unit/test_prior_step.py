"""export/nets/prior_step.py and the engine's PriorStepper: the prior one position at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from latentserve.errors import InvalidInput
from latentserve.export.nets.prior import PixelCNNPrior, PriorConfig
from latentserve.export.nets.prior_step import PriorStep, export_prior_step, run_steps, step_all
from latentserve.worker.runtime.engine import EngineConfig, ModelRuntime, image_rng
from latentserve.worker.runtime.repository import ModelRepository

torch.set_num_threads(1)
ONE_THREAD = EngineConfig(intra_op_threads=1)
GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_repo"


def small_prior(grid: tuple[int, int], seed: int = 0) -> PixelCNNPrior:
    torch.manual_seed(seed)
    prior = PixelCNNPrior(PriorConfig(num_codes=40, grid=grid, embed_dim=8, hidden=16, layers=2))
    with torch.no_grad():  # non-zero biases, so a missed bias term shows
        for conv, mix in prior.blocks:  # type: ignore[misc]
            conv.bias.normal_(0, 0.1)
            mix.bias.normal_(0, 0.1)
        prior.first.bias.normal_(0, 0.1)
    return prior.eval()


@pytest.mark.parametrize("grid", [(7, 7), (4, 6), (5, 3)])
def test_stepping_reproduces_the_full_prior(grid: tuple[int, int]) -> None:
    prior = small_prior(grid)
    idx = torch.randint(0, 40, (6, *grid), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = prior(idx)
    stepped = step_all(PriorStep(prior), idx)
    assert stepped.shape == full.shape
    assert float((stepped - full).abs().max()) < 1e-5


def test_positions_at_and_after_p_cannot_change_a_step() -> None:
    """Bit for bit: the decoder's unknown (zero) future equals the encoder's true one."""
    prior = small_prior((7, 7))
    step = PriorStep(prior)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 40, (4, 7, 7), generator=gen)
    caches = [torch.randn(s, generator=gen) for s in step.cache_shapes(4)]
    for c in caches:
        c[:, -1] = 0
    for p in (0, 1, 6, 7, 24, 48):
        other = idx.clone().reshape(4, -1)
        other[:, p:] = torch.randint(0, 40, other[:, p:].shape, generator=gen)
        garbled = [c.clone() for c in caches]
        for c in garbled:  # the last row is the zero row of "outside the grid"
            c[:, p:-1] = torch.randn(c[:, p:-1].shape, generator=gen) * 1e3
        pos = torch.tensor(p)
        with torch.no_grad():
            a = step(idx, pos, *caches)
            b = step(other.reshape(4, 7, 7), pos, *garbled)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), p


def test_onnx_step_graph_matches_torch(tmp_path: Path) -> None:
    prior = small_prior((7, 7))
    idx = torch.randint(0, 40, (5, 7, 7), generator=torch.Generator().manual_seed(3))
    path = tmp_path / "prior_step.onnx"
    export_prior_step(prior, idx[:2], path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["indices", "position", "cache0", "cache1"]
    with torch.no_grad():
        full = prior(idx).numpy()
    for batch in (idx[:1], idx):  # the batch axis is dynamic
        got = run_steps(sess, batch.numpy())
        assert np.abs(got - full[:len(batch)]).max() < 1e-5


def test_export_refuses_a_step_graph_that_is_not_the_prior(tmp_path: Path) -> None:
    from latentserve.errors import ModelIntegrityError

    prior = small_prior((7, 7))
    idx = torch.randint(0, 40, (2, 7, 7))
    with pytest.raises(ModelIntegrityError, match="prior_step.onnx differs"):
        export_prior_step(prior, idx, tmp_path / "s.onnx", tolerance=-1.0)


# -- the engine -------------------------------------------------------------------------

def tiny_runtime(tiny_repo: Path) -> ModelRuntime:
    return ModelRuntime(ModelRepository(tiny_repo).load("tiny-vqvae"), ONE_THREAD)


def test_the_tiny_vqvae_ships_a_step_graph(tiny_repo: Path, mnist_images: np.ndarray) -> None:
    rt = tiny_runtime(tiny_repo)
    assert "prior_step" in rt.manifest.files and rt.prior_step is not None
    idx = rt.encode(mnist_images[:20]).astype(np.int64)
    stepper = rt.prior_stepper(len(idx))
    assert stepper.stepwise
    assert np.abs(stepper.all_logits(idx) - rt.prior_logits(idx)).max() < 1e-4


def test_stepper_goes_in_raster_order(tiny_repo: Path) -> None:
    rt = tiny_runtime(tiny_repo)
    grid = np.zeros((2, 7, 7), np.int64)
    stepper = rt.prior_stepper(2)
    stepper.logits(0, grid)
    with pytest.raises(InvalidInput, match="expected position 1 of 49, got 2"):
        stepper.logits(2, grid)
    with pytest.raises(InvalidInput, match="shape"):
        stepper.logits(1, grid[:1])
    with pytest.raises(InvalidInput, match="fresh"):
        stepper.all_logits(grid)


def test_stepper_cuts_batches_like_the_engine(tiny_repo: Path, mnist_images: np.ndarray) -> None:
    rt = tiny_runtime(tiny_repo)
    small = ModelRuntime(rt.entry, EngineConfig(intra_op_threads=1, max_batch=3))
    idx = rt.encode(mnist_images[:8]).astype(np.int64)
    a = rt.prior_stepper(8).all_logits(idx)
    b = small.prior_stepper(8).all_logits(idx)
    assert np.abs(a - b).max() < 1e-5


def test_models_without_a_step_graph_use_full_passes() -> None:
    rt = ModelRuntime(ModelRepository(GOLDEN).load("golden-vqvae:1"), ONE_THREAD)
    assert rt.prior_step is None
    idx = np.random.default_rng(0).integers(0, rt.manifest.vq_static.num_codes,  # type: ignore[union-attr]
                                            (3, *rt.manifest.latent_shape))
    full = rt.prior_logits(idx)
    stepper = rt.prior_stepper(3)
    assert not stepper.stepwise
    h, w = rt.manifest.latent_shape
    for p in range(h * w):
        assert np.array_equal(stepper.logits(p, idx), full[:, :, p // w, p % w])
    assert np.array_equal(rt.prior_stepper(3).all_logits(idx), full)


def test_sampling_with_steps_draws_what_full_passes_draw(tiny_repo: Path) -> None:
    rt = tiny_runtime(tiny_repo)
    legacy = tiny_runtime(tiny_repo)
    legacy.prior_step = None  # as if exported before the step graph existed
    rngs = [image_rng(5, j) for j in range(12)]
    stepped = rt._sample_indices(rngs, 1.0)
    rngs = [image_rng(5, j) for j in range(12)]
    assert np.array_equal(stepped, legacy._sample_indices(rngs, 1.0))
