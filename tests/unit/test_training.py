"""Training: tiny runs lower their loss, are deterministic, and checkpoints rebuild."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentserve.export.data import split
from latentserve.export.train import (
    TrainConfig, load_checkpoint, loss_terms, save_checkpoint, to_float, train_model)
from latentserve.worker.errors import InvalidInput

from fixtures_models import tiny_configs

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
