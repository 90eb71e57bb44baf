"""Training: tiny runs lower their loss, are deterministic, and checkpoints rebuild."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_models import tiny_configs
from latentserve.errors import InvalidInput
from latentserve.export.training.data import split
from latentserve.export.training.train import (
    TrainConfig,
    load_checkpoint,
    loss_terms,
    save_checkpoint,
    to_float,
    train_model,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def small_data(mnist_images: np.ndarray):  # type: ignore[no-untyped-def]
    return split(mnist_images[:300], val_count=50, source="test")


@pytest.mark.parametrize("family", ["ae", "vae", "vqvae"])
def test_a_tiny_training_run_lowers_its_loss(small_data, family: str) -> None:  # type: ignore[no-untyped-def]
    mc, tc, pc = tiny_configs(family)
    tc = TrainConfig(**{**tc.__dict__, "steps": 40, "prior_steps": 5})
    ckpt = train_model(mc, tc, small_data, prior_config=pc)
    losses = [row["loss"] for row in ckpt["history"]]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_training_is_deterministic_and_the_checkpoint_rebuilds(small_data,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    mc, tc, _ = tiny_configs("ae")
    tc = TrainConfig(**{**tc.__dict__, "steps": 5})
    a = train_model(mc, tc, small_data)
    b = train_model(mc, tc, small_data)
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    path = save_checkpoint(a, tmp_path / "ae.pt")
    ckpt, model, prior = load_checkpoint(path)
    assert prior is None and ckpt["model_config"]["family"] == "ae"
    x = to_float(small_data.val[:4])
    torch.testing.assert_close(model.g_a(x), model.g_a(x))
    rebuilt = loss_terms("ae", model.train(), x, tc)
    assert torch.isfinite(rebuilt["loss"])


def test_training_refuses_mismatched_shapes(small_data) -> None:  # type: ignore[no-untyped-def]
    mc, tc, _ = tiny_configs("ae", (3, 32, 32))
    with pytest.raises(InvalidInput, match="takes"):
        train_model(mc, tc, small_data)


def test_split_keeps_validation_out_of_training(mnist_images: np.ndarray) -> None:
    data = split(mnist_images[:100], val_count=30, train_limit=50)
    assert len(data.train) == 50 and len(data.val) == 30
    np.testing.assert_array_equal(data.val, mnist_images[70:100])
    with pytest.raises(InvalidInput, match="val_count"):
        split(mnist_images[:10], val_count=10)


def test_prior_only_training_replaces_the_prior_of_a_vqvae_checkpoint(tmp_path: Path) -> None:
    from fixtures_models import MNIST
    from latentserve.cli import main

    if not MNIST.is_file():
        pytest.skip("needs ../shared/data/mnist")
    common = ["--data", str(MNIST), "--train-limit", "64", "--no-progress", "--threads", "1"]
    vq = tmp_path / "vq.pt"
    assert main(["train", "--family", "vqvae", "--out", str(vq), "--steps", "2",
                 "--hidden", "8", "--res-blocks", "0", "--num-codes", "16", "--code-dim", "4",
                 "--prior-steps", "1", "--prior-hidden", "8", "--prior-embed", "4",
                 "--prior-layers", "1", *common]) == 0
    out = tmp_path / "vq-prior.pt"
    assert main(["train", "--family", "prior", "--vqvae", str(vq), "--out", str(out),
                 "--prior-steps", "2", "--prior-hidden", "12", "--prior-embed", "4",
                 "--prior-layers", "2", "--no-progress"]) == 0
    ckpt, model, prior = load_checkpoint(out)
    assert prior is not None and prior.config.hidden == 12 and prior.config.num_codes == 16
    assert len(ckpt["prior_history"]) == 2
    assert main(["train", "--family", "prior", "--out", str(out), "--no-progress"]) == 1
    # A fresh, wider decoder on the frozen codes: the encoder, codebook and prior stay.
    dec = tmp_path / "vq-dec.pt"
    assert main(["train", "--family", "decoder", "--vqvae", str(out), "--out", str(dec),
                 "--steps", "3", "--decoder-hidden", "12", "--no-progress"]) == 0
    ckpt2, model2, prior2 = load_checkpoint(dec)
    assert model2.config.dec_hidden == 12 and model2.g_s[0].out_channels == 12
    torch.testing.assert_close(model2.vq.codebook.embed, model.vq.codebook.embed)
    torch.testing.assert_close(model2.g_a[0].weight, model.g_a[0].weight)
    assert prior2 is not None and len(ckpt2["decoder_history"]) == 3
