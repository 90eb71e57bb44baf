"""The photo trainer's schedule, time budget and resuming (tiny nets, a few steps)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentserve.export.training.photo import (
    PhotoTrainConfig,
    load_photo_checkpoint,
    lr_factor,
    main,
    parse_rung,
    run_share,
    total_steps,
)

torch.set_num_threads(1)


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    cfg = PhotoTrainConfig(lr=5e-4, min_lr=1e-5, warmup=10, steps=110)
    lrs = [cfg.lr * lr_factor(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(5e-5) and lrs[9] == pytest.approx(5e-4)
    assert lrs[10] == pytest.approx(5e-4)                     # the decay starts at the peak
    assert lrs[60] == pytest.approx(1e-5 + (5e-4 - 1e-5) * 0.5)  # half way: the mean
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert cfg.lr * lr_factor(10, cfg, done=1.0) == pytest.approx(1e-5)
    assert cfg.lr * lr_factor(10, cfg, done=2.0) == pytest.approx(1e-5)  # clamped


def test_time_budget_leads_the_schedule_when_it_is_ahead() -> None:
    cfg = PhotoTrainConfig(steps=1000, warmup=0, budget_s=100.0)
    assert run_share(100, 5.0, cfg) == pytest.approx(0.1)    # steps ahead of time
    assert run_share(100, 50.0, cfg) == pytest.approx(0.5)   # time ahead of steps
    assert run_share(100, 50.0, PhotoTrainConfig(steps=1000)) == pytest.approx(0.1)
    assert math.isclose(lr_factor(0, cfg, run_share(0, 100.0, cfg)), cfg.min_lr / cfg.lr)


def test_parse_rung_names_the_bad_argument() -> None:
    assert parse_rung("photo-lo=0.002") == ("photo-lo", 0.002)
    for bad in ("photo-lo", "=0.1", "x=abc"):
        with pytest.raises(ValueError, match="NAME=LAMBDA"):
            parse_rung(bad)


def test_resume_keeps_history_and_counts_every_sitting(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "photos"
    data.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(
            data / f"{i}.png")
    common = ["--data", str(data), "--threads", "1", "--n", "8", "--m", "8", "--batch", "2",
              "--crop", "32", "--warmup", "1"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([*common, "--out", str(first), "--base-steps", "3"]) == 0
    ckpt, _ = load_photo_checkpoint(first / "base.pt")
    assert total_steps(ckpt) == 3 and not ckpt["init"]
    # a second sitting: the base resumed for 2 more steps, then a rung of 2
    assert main([*common, "--out", str(second), "--init", str(first / "base.pt"),
                 "--base-steps", "2", "--rung", "r=0.002", "--rung-steps", "2"]) == 0
    base, net = load_photo_checkpoint(second / "base.pt")
    assert base["init"] == {"path": str(first / "base.pt"), "steps": 3}
    assert total_steps(base) == 5
    assert net.config.n == 8 and net.config.m == 8          # the checkpoint's shapes
    rung, _ = load_photo_checkpoint(second / "r.pt")
    assert total_steps(rung) == 7 and rung["base_steps"] == 5
    assert [h["step"] for h in rung["history"]] == [3, 2, 2]  # every sitting's last row
    # only a rung, from the saved base (--base-steps 0): base.pt is not rewritten
    before = (second / "base.pt").read_bytes()
    assert main([*common, "--out", str(second), "--init", str(second / "base.pt"),
                 "--base-steps", "0", "--rung", "s=0.03", "--rung-steps", "1"]) == 0
    assert (second / "base.pt").read_bytes() == before
    assert total_steps(load_photo_checkpoint(second / "s.pt")[0]) == 6
