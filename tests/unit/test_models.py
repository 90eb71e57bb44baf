"""Model contracts: shapes from the config, VQ straight-through and dead codes, a causal prior."""

from __future__ import annotations

import pytest
import torch

from latentserve.export.nets.models import MODELS, ModelConfig, build_model
from latentserve.export.nets.prior import MaskedConv2d, PixelCNNPrior, PriorConfig
from latentserve.export.nets.quantizer import Codebook, VectorQuantizer

torch.set_num_threads(1)


@pytest.mark.parametrize("family", ["ae", "vae", "vqvae"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 16, 24)])
def test_forward_returns_named_tensors_of_config_shapes(family: str,
                                                        shape: tuple[int, int, int]) -> None:
    cfg = ModelConfig(family=family, image_shape=shape, hidden=8, latent_channels=3,
                      num_codes=16, code_dim=4)
    model = build_model(cfg)
    assert isinstance(model, MODELS[family])
    x = torch.rand(2, *shape)
    out = model(x)
    assert out["x_hat"].shape == x.shape
    h, w = shape[1] // 4, shape[2] // 4
    if family == "vqvae":
        assert out["indices"].shape == (2, h, w)
    elif family == "ae":
        assert out["likelihoods"].shape == (2, 3, h, w)
        assert torch.all(out["bits"] > 0)
    else:
        assert out["mu"].shape == (2, 3, h, w) and torch.all(out["kl"] >= 0)


def test_config_rejects_sizes_not_divisible_by_4_and_unknown_families() -> None:
    with pytest.raises(ValueError, match="multiples of 4"):
        ModelConfig(family="ae", image_shape=(1, 30, 28))
    with pytest.raises(ValueError, match="family 'gan'"):
        ModelConfig(family="gan")


def test_straight_through_gradient_reaches_the_encoder_through_vq() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="vqvae", hidden=8, num_codes=16, code_dim=4))
    x = torch.rand(4, 1, 28, 28)
    out = model(x)
    recon = torch.nn.functional.mse_loss(out["x_hat"], x)
    recon.backward()  # the reconstruction term only: no commitment loss involved
    first_conv = model.g_a[0]
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0


def test_codebook_buffers_move_by_ema_not_by_the_optimiser() -> None:
    vq = VectorQuantizer(8, 2)
    names = {n for n, _ in vq.named_buffers()}
    assert {"codebook.embed", "codebook.cluster_size", "codebook.embed_avg"} <= names
    assert not list(vq.parameters())
    vq.train()
    before = vq.codebook.embed.clone()
    vq(torch.randn(2, 2, 3, 3))
    assert not torch.equal(before, vq.codebook.embed)


def test_dead_codes_are_restarted_on_batch_vectors() -> None:
    torch.manual_seed(0)
    book = Codebook(4, 2, decay=0.5, dead_threshold=0.5)
    data = torch.tensor([[10.0, 10.0]]).repeat(64, 1) + 0.01 * torch.randn(64, 2)
    book.init_from(data)
    book.embed[1:] = -100.0  # three codes far from every vector: never chosen
    book.embed_avg.copy_(book.embed)
    for _ in range(5):
        idx = book.nearest(data)
        book.update(data, idx)
        book.restart_dead(data)
    assert book.restarts >= 3
    assert torch.all((book.embed - 10.0).abs() < 1.0), "every code now sits on the data"


def test_masked_convolutions_reject_bad_kernels() -> None:
    with pytest.raises(ValueError, match="odd"):
        MaskedConv2d("A", 1, 1, (4, 3))
    with pytest.raises(ValueError, match="'C'"):
        MaskedConv2d("C", 1, 1, (3, 3))


def test_pixelcnn_prior_is_causal_in_raster_order() -> None:
    torch.manual_seed(0)
    cfg = PriorConfig(num_codes=10, grid=(4, 5), embed_dim=6, hidden=12, layers=2, dropout=0.0)
    prior = PixelCNNPrior(cfg).eval()
    base = torch.randint(0, 10, (1, 4, 5))
    logits = prior(base)
    h, w = cfg.grid
    for pos in range(h * w):
        y, x = divmod(pos, w)
        changed = base.clone()
        changed[0, y, x] = (changed[0, y, x] + 1) % 10
        new = prior(changed).flatten(2)
        diff = (new - logits.flatten(2)).abs().amax(1)[0]  # per position
        assert torch.all(diff[:pos + 1] == 0), f"changing position {pos} moved earlier logits"
        if pos + 1 < h * w:
            assert diff[pos + 1:].max() > 0, "later positions should see the change"


def test_prior_sampling_gives_index_grids() -> None:
    prior = PixelCNNPrior(PriorConfig(num_codes=7, grid=(2, 3), embed_dim=4, hidden=8,
                                      layers=1)).eval()
    grid = prior.sample(3, generator=torch.Generator().manual_seed(1))
    assert grid.shape == (3, 2, 3) and grid.min() >= 0 and grid.max() < 7
