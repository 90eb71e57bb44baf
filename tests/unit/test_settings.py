"""The one configuration mechanism: flags and env vars derived from typed fields."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from latentserve.errors import InvalidInput
from latentserve.service.client.settings import ClientSettings
from latentserve.service.jobs.settings import JobSettings
from latentserve.service.server.config import ServiceConfig
from latentserve.settings import ENV_PREFIX, Settings
from latentserve.worker.config import WorkerConfig
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.runtime.settings import RuntimeSettings

CLASSES = (ServiceConfig, JobSettings, QueueConfig, WorkerConfig, ClientSettings,
           RuntimeSettings)


def parsed(cls: type[Settings], *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cls.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_over_env_over_defaults_with_nested_settings() -> None:
    env = {"LATENTSERVE_CHUNK_SIZE": "64", "LATENTSERVE_GRPC_THREADS": "8",
           "REDIS_URL": "redis://q:6379/0"}
    args = parsed(ServiceConfig, "--grpc-threads", "12", "--max-job-streams", "3")
    c = ServiceConfig.from_sources(args, env)
    assert c.grpc_threads == 12                       # flag over env
    assert c.jobs.queue.chunk_size == 64              # nested two deep, from env
    assert c.jobs.redis_url == "redis://q:6379/0"     # the fallback variable
    assert c.jobs.max_job_streams == 3
    assert ServiceConfig.from_sources(None, {}).jobs.redis_url == "embedded"
    # LATENTSERVE_REDIS_URL comes before REDIS_URL; overrides win over both.
    both = {**env, "LATENTSERVE_REDIS_URL": "redis://mine:1/0"}
    assert ServiceConfig.from_env(both).jobs.redis_url == "redis://mine:1/0"
    assert ServiceConfig.from_env(both, chunk_size=5).jobs.queue.chunk_size == 5


def test_one_name_per_concept() -> None:
    # The repository is --models (alias --repo) and LATENTSERVE_MODELS everywhere.
    for cls in (ServiceConfig, WorkerConfig, RuntimeSettings):
        flags = parsed(cls, "--repo", "/r") if cls is not WorkerConfig else \
            parsed(cls, "--repo", "/r", "--redis", "redis://h:1/0")
        assert str(cls.from_sources(flags, {}).models) == "/r"
        env = {"LATENTSERVE_MODELS": "/e", "REDIS_URL": "redis://h:1/0"}
        assert str(cls.from_env(env).models) == "/e"
    # The queue's fields mean the same on both sides.
    worker = WorkerConfig.from_env({"REDIS_URL": "redis://h:1/0", "LATENTSERVE_PREFIX": "x:"})
    assert worker.queue == ServiceConfig.from_env({"LATENTSERVE_PREFIX": "x:"}).jobs.queue
    # The old serve flag still works, as an alias of the one name.
    assert ServiceConfig.from_sources(parsed(ServiceConfig, "--job-chunk-size", "9"),
                                      {}).jobs.queue.chunk_size == 9


def test_every_flag_is_a_field_and_every_field_has_help() -> None:
    fields_of = {cls: {f.name for f in dataclasses.fields(cls)} for cls in CLASSES}
    for cls in CLASSES:
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser)
        dests = {a.dest for a in parser._actions} - {"help"}
        # Its own fields, and those of the settings it embeds (the queue's, the jobs').
        embedded = {QueueConfig} if cls in (WorkerConfig, JobSettings) else \
            {JobSettings, QueueConfig} if cls is ServiceConfig else set()
        allowed = fields_of[cls].union(*(fields_of[e] for e in embedded))
        assert dests <= allowed, dests - allowed
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_bool_flags_take_a_value_or_none() -> None:
    for argv, want in ((["--burst"], True), (["--burst", "false"], False),
                       (["--no-preload"], None), ([], None)):
        args = parsed(WorkerConfig, "--redis", "redis://h:1/0", *argv)
        c = WorkerConfig.from_sources(args, {})
        if want is not None:
            assert c.burst is want
        assert c.preload is ("--no-preload" not in argv)


def test_bad_values_name_the_source_and_what_is_allowed() -> None:
    with pytest.raises(InvalidInput, match=r"LATENTSERVE_CHUNK_SIZE='many': chunk_size must "
                                           r"be an integer"):
        QueueConfig.from_env({"LATENTSERVE_CHUNK_SIZE": "many"})
    with pytest.raises(InvalidInput, match="log_format must be one of text, json"):
        ServiceConfig.from_env({"LATENTSERVE_LOG_FORMAT": "xml"})
    with pytest.raises(InvalidInput, match="pool route 'nope' must look like MODEL=POOL"):
        QueueConfig.from_env({"LATENTSERVE_POOL_ROUTES": "nope"})
    with pytest.raises(InvalidInput, match="unknown QueueConfig settings"):
        QueueConfig.from_env({}, chunk_sise=3)
    with pytest.raises(SystemExit):
        parsed(ServiceConfig, "--port", "eighty")
    with pytest.raises(InvalidInput, match="needs a Redis URL"):
        WorkerConfig.from_env({})


def test_env_names_are_the_prefix_and_the_field() -> None:
    assert ServiceConfig.env_name("grpc_threads") == ENV_PREFIX + "GRPC_THREADS"
    assert WorkerConfig.flag_name("redis_url") == "--redis"
    assert ClientSettings.flag_name("client_cert") == "--tls-cert"
    assert ClientSettings.from_env({"LATENTSERVE_CLIENT_CERT": "c.pem"}).client_cert == \
        Path("c.pem")


def test_client_token_from_file_or_env(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("secret\n")
    assert ClientSettings.from_env({"LATENTSERVE_TOKEN_FILE": str(token)}).security().token \
        == "secret"
    assert ClientSettings.from_env({"LATENTSERVE_TOKEN": "s2"}).security().token == "s2"
    assert "secret" not in repr(ClientSettings.from_env({"LATENTSERVE_TOKEN": "secret"}))
    (tmp_path / "empty").write_text("")
    with pytest.raises(InvalidInput, match="is empty"):
        ClientSettings(token_file=tmp_path / "empty").security()
    assert ClientSettings().server == "127.0.0.1:50051"
