"""GDN / IGDN transforms, the flat VAE latent and the learned likelihood scale (issue 15)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_models import tiny_configs
from latentserve.export.nets.gdn import GDN
from latentserve.export.nets.models import ModelConfig, build_model
from latentserve.export.publish.exporter import export_checkpoint
from latentserve.export.training.data import split
from latentserve.export.training.train import TrainConfig, loss_terms, rebuild, train_model
from latentserve.worker.runtime.engine import ModelRuntime
from latentserve.worker.runtime.repository import ModelRepository

torch.set_num_threads(1)


@pytest.mark.parametrize("inverse", [False, True])
def test_gdn_keeps_shapes_and_signs_and_its_parameters_positive(inverse: bool) -> None:
    torch.manual_seed(0)
    gdn = GDN(5, inverse=inverse)
    with torch.no_grad():  # push the stored parameters far below their bounds
        gdn.beta.fill_(-3.0)
        gdn.gamma.fill_(-1.0)
    beta, gamma = gdn.effective()
    assert torch.all(beta > 0) and torch.all(gamma >= 0)
    x = torch.randn(2, 5, 6, 7)
    y = gdn(x)
    assert y.shape == x.shape and torch.all(torch.isfinite(y))
    assert torch.equal(torch.sign(y), torch.sign(x))


def test_gdn_shrinks_and_igdn_grows_large_inputs_and_the_bound_passes_gradients() -> None:
    gdn, igdn = GDN(3), GDN(3, inverse=True)
    x = torch.full((1, 3, 2, 2), 10.0)
    assert torch.all(gdn(x).abs() < x.abs()) and torch.all(igdn(x).abs() > x.abs())
    with torch.no_grad():
        gdn.gamma.fill_(-1.0)  # below the bound: forward clipped, gradient still reaches it
    gdn(x).sum().backward()
    assert gdn.gamma.grad is not None and gdn.gamma.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["ae", "vae", "vqvae"])
def test_gdn_models_have_the_grid_shapes(family: str) -> None:
    cfg = ModelConfig(family=family, hidden=8, latent_channels=3, num_codes=16, code_dim=4,
                      transform="gdn", res_blocks=1)
    out = build_model(cfg)(torch.rand(2, 1, 28, 28))
    assert out["x_hat"].shape == (2, 1, 28, 28)
    key = {"ae": "y", "vae": "mu", "vqvae": "z_e"}[family]
    assert out[key].shape[2:] == (7, 7)


@pytest.mark.parametrize("transform", ["relu", "gdn"])
def test_a_flat_latent_is_c_numbers_per_image(transform: str) -> None:
    for family in ("ae", "vae"):
        cfg = ModelConfig(family=family, hidden=8, latent_channels=6, latent_layout="flat",
                          transform=transform, image_shape=(1, 16, 24))
        assert cfg.latent_grid == (1, 1)
        model = build_model(cfg)
        out = model(torch.rand(3, 1, 16, 24))
        assert out["x_hat"].shape == (3, 1, 16, 24)
        assert model.encode_latent(torch.rand(3, 1, 16, 24)).shape == (3, 6, 1, 1)
    with pytest.raises(ValueError, match="grid"):
        ModelConfig(family="vqvae", latent_layout="flat")
    with pytest.raises(ValueError, match="transform"):
        ModelConfig(family="ae", transform="tanh")


def test_the_learned_sigma_loss_is_the_negative_elbo_and_trains_sigma() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(family="vae", hidden=8, latent_channels=4, latent_layout="flat",
                      learned_sigma=True)
    model = build_model(cfg).eval()  # eval: z = mu, so the terms are deterministic
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        model.log_sigma.fill_(math.log(0.3))
    terms = loss_terms("vae", model, x, TrainConfig())
    out = model(x)
    sigma = 0.3
    nll = ((out["x_hat"] - x) ** 2).flatten(1).sum(1) / (2 * sigma**2) + 784 * math.log(sigma)
    torch.testing.assert_close(terms["loss"], ((nll + out["kl"]).mean() / 784).float())
    terms["loss"].backward()
    assert model.log_sigma.grad is not None and model.log_sigma.grad != 0


@pytest.fixture(scope="module")
def small_data(mnist_images: np.ndarray):  # type: ignore[no-untyped-def]
    return split(mnist_images[:300], val_count=50, source="test")


def test_flat_vae_and_gdn_ae_train_export_code_and_sample(small_data,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path) -> None:
    cases = {
        "flat-vae": ModelConfig(family="vae", hidden=16, res_blocks=0, latent_channels=4,
                                latent_layout="flat", learned_sigma=True),
        "gdn-ae": ModelConfig(family="ae", hidden=16, res_blocks=0, latent_channels=4,
                              transform="gdn"),
    }
    _, tc, _ = tiny_configs("ae")
    tc = TrainConfig(**{**tc.__dict__, "steps": 40})
    for name, mc in cases.items():
        ckpt = train_model(mc, tc, small_data)
        losses = [row["loss"] for row in ckpt["history"]]
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
        model, _ = rebuild(ckpt)
        assert type(model) is type(build_model(mc))
        export_checkpoint(ckpt, repo=tmp_path, name=name, version=1, data=small_data,
                          gmm_components=2)
        runtime = ModelRuntime(ModelRepository(tmp_path).load(name))
        want = (4, 1, 1) if mc.latent_layout == "flat" else (4, 7, 7)
        assert tuple(runtime.manifest.latent_shape) == want
        assert runtime.manifest.quality["onnx_max_abs_diff"] <= 1e-4
        symbols = runtime.encode(small_data.val[:5])
        assert symbols.shape == (5, *want)
        assert runtime.decode(symbols).shape == (5, 1, 28, 28)
        assert runtime.sample(3, seed=1).shape == (3, 1, 28, 28)


def test_a_second_stage_needs_a_flat_vae() -> None:
    with pytest.raises(ValueError, match="second stage"):
        ModelConfig(family="vae", stage2_hidden=8)
    with pytest.raises(ValueError, match="second stage"):
        ModelConfig(family="ae", latent_layout="flat", stage2_hidden=8)


def test_a_two_stage_vae_trains_both_stages_and_serves_the_second_stage_latent(  # type: ignore[no-untyped-def]
        small_data, tmp_path: Path) -> None:
    mc = ModelConfig(family="vae", hidden=16, res_blocks=0, latent_channels=4,
                     latent_layout="flat", stage2_hidden=16)
    _, tc, _ = tiny_configs("vae")
    tc = TrainConfig(**{**tc.__dict__, "steps": 20, "stage2_steps": 60})
    ckpt = train_model(mc, tc, small_data)
    assert len(ckpt["history"]) == 80
    stage2 = [row["loss"] for row in ckpt["history"][20:]]
    assert "gamma" in ckpt["history"][-1] and np.mean(stage2[-5:]) < np.mean(stage2[:5])
    model, _ = rebuild(ckpt)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        u = model.encode_latent(x)
        mu_z = model.posterior(x)[0]
        assert u.shape == (3, 4, 1, 1)
        torch.testing.assert_close(u, model.stage2.posterior(mu_z.flatten(1))[0][:, :, None, None])
        z_hat = model.stage2.dec(u.flatten(1))[:, :, None, None]
        torch.testing.assert_close(model.decode_latent(u), model.g_s(z_hat))
    export_checkpoint(ckpt, repo=tmp_path, name="two-stage", version=1, data=small_data)
    runtime = ModelRuntime(ModelRepository(tmp_path).load("two-stage"))
    assert runtime.manifest.quality["onnx_max_abs_diff"] <= 1e-4
    assert runtime.decode(runtime.encode(small_data.val[:4])).shape == (4, 1, 28, 28)
    assert runtime.sample(3, seed=1).shape == (3, 1, 28, 28)
