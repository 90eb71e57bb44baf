"""ServiceConfig: flags over LATENTSERVE_* env vars over defaults, validated once."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest

from latentserve.errors import InvalidInput
from latentserve.service.server.config import ServiceConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve", exit_on_error=False)
    ServiceConfig.add_arguments(p)
    return p


def test_defaults_are_valid_and_frozen() -> None:
    c = ServiceConfig.from_env({})
    assert c.port == 50051 and c.metrics_port == 9090 and c.models == Path("models")
    assert c.max_message_bytes == 64 << 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1  # type: ignore[misc]


def test_env_vars_fill_every_type() -> None:
    env = {"LATENTSERVE_PORT": "6000", "LATENTSERVE_METRICS_PORT": "none",
           "LATENTSERVE_BATCHING": "false", "LATENTSERVE_MODELS": "/srv/models",
           "LATENTSERVE_GRACE_S": "2.5", "LATENTSERVE_MAX_QUEUE_DELAY_US": "5_000",
           "LATENTSERVE_PROVIDER": "auto"}
    c = ServiceConfig.from_env(env)
    assert (c.port, c.metrics_port, c.batching, c.models, c.grace_s, c.max_queue_delay_us,
            c.provider) == (6000, None, False, Path("/srv/models"), 2.5, 5000, "auto")


def test_flags_win_over_env_and_absent_flags_do_not() -> None:
    args = parser().parse_args(["--port", "7000", "--max-batch-size", "32"])
    c = ServiceConfig.from_sources(args, {"LATENTSERVE_PORT": "6000",
                                          "LATENTSERVE_MAX_IMAGES_PER_REQUEST": "9"})
    assert (c.port, c.max_batch_size, c.max_images_per_request) == (7000, 32, 9)


def test_a_flag_can_turn_an_optional_setting_off() -> None:
    args = parser().parse_args(["--metrics-port", "none"])
    config = ServiceConfig.from_sources(args, {"LATENTSERVE_METRICS_PORT": "9100"})
    assert config.metrics_port is None
    assert ServiceConfig.from_sources(parser().parse_args([]), {}).metrics_port == 9090


def test_bad_values_name_the_setting_and_what_is_allowed() -> None:
    with pytest.raises(InvalidInput, match="LATENTSERVE_PORT='http'.*port must be an integer"):
        ServiceConfig.from_env({"LATENTSERVE_PORT": "http"})
    with pytest.raises(InvalidInput, match="batching must be true/false"):
        ServiceConfig.from_env({"LATENTSERVE_BATCHING": "maybe"})
    with pytest.raises(InvalidInput, match="max_batch_size must be >= 1, got 0"):
        ServiceConfig.from_env({}, max_batch_size=0)
    with pytest.raises(InvalidInput, match="provider 'tpu' is not one of"):
        ServiceConfig.from_env({}, provider="tpu")
    with pytest.raises(InvalidInput, match="port must be between 0 and 65535, got 70000"):
        ServiceConfig(port=70000)
    with pytest.raises(argparse.ArgumentError, match="--port='x'"):
        parser().parse_args(["--port", "x"])


def test_threads_fill_the_cores_without_oversubscribing() -> None:
    cores = os.cpu_count() or 1
    c = ServiceConfig.from_env({})
    assert c.compute_threads == min(2, cores)
    assert c.compute_threads * c.ort_threads <= max(cores, c.compute_threads)
    e = ServiceConfig(compute_workers=3, intra_op_threads=2).engine_config()
    assert e.intra_op_threads == 2 and e.provider == "cpu"


def test_address_brackets_ipv6() -> None:
    assert ServiceConfig(host="::1", port=5).address == "[::1]:5"
    assert ServiceConfig(host="127.0.0.1", port=0).address == "127.0.0.1:0"
