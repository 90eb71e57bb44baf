"""docker-compose.yml, proved without a Docker engine.

1. ``docker-compose config -q`` (Debian's docker-compose) validates the file, and the
   commands and environments it resolves are the ones this test reads.
2. The file's promises that need no process: AOF, health checks, GPU reservation,
   scalable workers, stop grace periods longer than the in-process graces.
3. Each service's ``command`` is started with its ``environment`` as a plain local
   process: Debian's redis-server with the compose flags, the service, two workers
   (``worker`` with its provider interpolated to ``cpu``, and ``worker-cpu``), on loopback
   with free ports. Health checks are the compose ones, run as written. A compress job
   and a sample job then go through them. If the file and the processes disagree (a
   flag or variable the program does not know, a port it does not listen on, a health
   check that cannot pass), the test fails.

The only rewrites from container to host: the host name ``redis`` -> 127.0.0.1, each
container port -> a free port, ``0.0.0.0`` -> 127.0.0.1, and each volume's mount point
-> a local folder (the model volume -> the ``tiny_repo`` fixture).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$\$")


# -- reading the file ---------------------------------------------------------------------
def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (comments and blanks skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: line {line!r} is not KEY=VALUE"
            env[key.strip()] = value.strip()
    return env


def variables(text: str) -> dict[str, str | None]:
    """Every ``${VAR}`` / ``${VAR:-default}`` in the text: name -> default (None: none)."""
    return {m.group(1): m.group(2) for m in _VAR.finditer(text) if m.group(1)}


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution over every string of a loaded YAML tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if env.get(name):
            return env[name]
        if default is None:
            raise AssertionError(f"${{{name}}} has no value and no default")
        return default
    return _VAR.sub(sub, value)


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with anchors merged and variables substituted."""
    raw = yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves anchors and `<<` merges
    return interpolate(raw, env if env is not None else read_env_file(ENV_EXAMPLE))


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def seconds(duration: str) -> float:
    """A compose duration (``45s``, ``1m30s``, ``500ms``) in seconds."""
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts, f"{duration!r} is not a duration"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


# -- 1. docker-compose config -------------------------------------------------------------
def test_env_example_matches_the_compose_defaults() -> None:
    used = variables(COMPOSE.read_text())
    example = read_env_file(ENV_EXAMPLE)
    for name, default in used.items():
        assert name in example, f"${{{name}}} is used in docker-compose.yml, not in .env.example"
        assert default is not None, f"${{{name}}} needs a default so compose works without .env"
        assert example[name] == default, (
            f".env.example sets {name}={example[name]}, the compose default is {default}")
    unused = set(example) - set(used) - {"COMPOSE_PROJECT_NAME"}
    assert not unused, f".env.example sets variables the compose file never reads: {unused}"


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose is not installed (apt-get install docker-compose)")
def test_docker_compose_config_validates_and_agrees() -> None:
    base = ["docker-compose", "--project-directory", str(ROOT), "-f", str(COMPOSE),
            "--env-file", str(ENV_EXAMPLE)]
    run = subprocess.run(base + ["config", "-q"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    run = subprocess.run(base + ["--profile", "cpu", "--profile", "export", "config"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    resolved = yaml.safe_load(run.stdout)["services"]
    ours = load_compose()["services"]
    assert set(resolved) == set(ours) == {"redis", "service", "worker", "worker-cpu", "export"}
    for name, svc in ours.items():
        assert resolved[name].get("command") == svc.get("command"), name
        assert env_of(resolved[name]) == env_of(svc), name


# -- 2. what the file promises ------------------------------------------------------------
def test_compose_promises() -> None:
    services = load_compose()["services"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for name in ("redis", "service"):
        assert services[name]["healthcheck"]["test"], name
    assert "grpc_health.v1" in " ".join(services["service"]["healthcheck"]["test"])
    for name in ("service", "worker", "worker-cpu"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert any(v.split(":")[1] == "/models" for v in services[name]["volumes"])
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("worker", "worker-cpu"):  # --scale needs no fixed name and no host port
        assert "container_name" not in services[name] and "ports" not in services[name]
        grace = float(env_of(services[name])["LATENTSERVE_GRACE_S"])
        assert seconds(services[name]["stop_grace_period"]) > grace, name
    assert seconds(services["service"]["stop_grace_period"]) > float(
        env_of(services["service"])["LATENTSERVE_GRACE_S"])
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["export"]["profiles"] == ["export"]
    # the CPU worker is the GPU worker with another provider and image, nothing else
    gpu, cpu = env_of(services["worker"]), env_of(services["worker-cpu"])
    assert gpu.pop("LATENTSERVE_PROVIDER") == "cuda" and cpu.pop("LATENTSERVE_PROVIDER") == "cpu"
    assert gpu == cpu and services["worker"]["command"] == services["worker-cpu"]["command"]


# -- 3. the services as local processes ---------------------------------------------------
WORKER_METRICS = 9091  # the workers' metrics port in docker-compose.yml


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Localizer:
    """Rewrites container names, ports and mount points to this machine's."""

    def __init__(self, ports: Mapping[int, int], mounts: Mapping[str, str]) -> None:
        self.ports = dict(ports)
        self.mounts = dict(mounts)

    def __call__(self, text: str) -> str:
        text = text.replace("0.0.0.0", "127.0.0.1")
        text = re.sub(r"(?<=//)redis(?=:)", "127.0.0.1", text)
        for inside, outside in self.ports.items():
            text = re.sub(rf"(?<!\d){inside}(?!\d)", str(outside), text)
        for inside, outside in self.mounts.items():
            text = re.sub(rf"(?<![\w/.]){re.escape(inside)}(?=/|$|\s|:)", outside, text)
        return text


def mounts_of(service: dict[str, Any], volumes: Mapping[str, str]) -> dict[str, str]:
    """Container mount point -> local folder, for each ``name:/path[:mode]`` volume."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        assert source in volumes, f"volume {source!r} has no local folder in this test"
        out[target] = volumes[source]
    return out


def process_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without latentserve/Redis settings, plus the service's own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LATENTSERVE_") and k not in ("REDIS_URL",)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def healthcheck(service: dict[str, Any], local: Localizer, env: Mapping[str, str]) -> list[str]:
    test = [local(t) for t in service["healthcheck"]["test"]]
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1]]
    assert test[0] == "CMD", f"healthcheck {test} must start with CMD or CMD-SHELL"
    return test[1:]


def wait_healthy(name: str, check: list[str], env: Mapping[str, str], proc: subprocess.Popen,
                 budget_s: float) -> None:
    """Run the compose health check until it passes, as Docker would (polling is how
    health checks work); fail at once if the process under test exits."""
    deadline = time.monotonic() + budget_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode} before it was healthy")
        last = subprocess.run(check, env=dict(env), capture_output=True, text=True, timeout=15)
        if last.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} not healthy after {budget_s}s: {check} -> "
                         f"{last.returncode if last else '?'} {last.stderr[-500:] if last else ''}")


def wait_worker_ready(name: str, proc: subprocess.Popen, redis_port: int,
                      budget_s: float) -> dict[str, Any]:
    """The worker's own health record in Redis (``ready`` once its models are loaded)."""
    import redis

    from latentserve.worker.jobqueue.consumer import worker_health

    client = redis.Redis(host="127.0.0.1", port=redis_port)
    deadline = time.monotonic() + budget_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode} before it was ready")
            mine = [h for h in worker_health(client) if h["pid"] == proc.pid and h["ready"]]
            if mine:
                return mine[0]
            time.sleep(0.2)  # the record is refreshed on the worker's heartbeat
    finally:
        client.close()
    raise AssertionError(f"{name} (pid {proc.pid}) wrote no ready health record in {budget_s}s")


def wait_job(client: Any, job_id: str, procs: Mapping[str, subprocess.Popen],
             budget_s: float) -> Any:
    """Follow WatchJob to the job's end; fail early if a process of the stack dies."""
    import queue
    import threading

    from latentserve.service.client.jobs import state_name

    updates: queue.Queue[Any] = queue.Queue()

    def follow() -> None:
        try:
            for job in client.watch(job_id):
                updates.put(job)
        except Exception as exc:  # handed to the test thread, which raises it
            updates.put(exc)
        updates.put(None)

    threading.Thread(target=follow, daemon=True).start()
    deadline = time.monotonic() + budget_s
    last = None
    while time.monotonic() < deadline:
        dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
        assert not dead, f"processes exited during job {job_id}: {dead}"
        try:
            item = updates.get(timeout=1.0)
        except queue.Empty:
            continue
        if isinstance(item, Exception):
            raise item
        if item is None:
            assert last is not None
            return last
        last = item
        if state_name(item.state) in ("succeeded", "failed", "cancelled"):
            return item
    raise AssertionError(f"job {job_id} did not end within {budget_s}s; last: {last}")


def stop_all(procs: list[tuple[str, subprocess.Popen, float]]) -> list[str]:
    """SIGTERM in reverse start order; each must exit within its stop_grace_period."""
    late = []
    for name, proc, grace in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                late.append(f"{name} ignored SIGTERM for its whole {grace}s stop_grace_period")
    return late


@pytest.fixture
def compose_stack(tiny_repo: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server): "
                    "the compose test runs Debian's redis-server with the compose flags")
    env_file = read_env_file(ENV_EXAMPLE)
    # No GPU here: the GPU worker's provider comes from WORKER_PROVIDER, set to cpu.
    services = load_compose({**env_file, "WORKER_PROVIDER": "cpu"})["services"]
    ports = {6379: free_port(), 50051: free_port(), 9090: free_port()}
    (tmp_path / "redis-data").mkdir()
    volumes = {"models": str(tiny_repo), "redis-data": str(tmp_path / "redis-data")}
    procs: list[tuple[str, subprocess.Popen, float]] = []
    info: dict[str, Any] = {"ports": ports, "services": services}
    try:
        for name in ("redis", "service", "worker", "worker-cpu"):
            svc = services[name]
            # Each worker replica has a container of its own; here they share a host, so
            # each gets its own port for the metrics port the compose file exposes.
            own = {**ports, WORKER_METRICS: free_port()} if name.startswith("worker") else ports
            info[f"{name}-ports"] = own
            local = Localizer(own, mounts_of(svc, volumes))
            cmd = [local(c) for c in svc["command"]]
            env = process_env({k: local(v) for k, v in env_of(svc).items()})
            if name == "redis":  # loopback only (the container listens on its own network)
                cmd += ["--bind", "127.0.0.1"]
            with open(tmp_path / f"{name}.log", "wb") as log:  # the process holds its own copy
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=tmp_path)
            grace = seconds(svc.get("stop_grace_period", "10s"))
            procs.append((name, proc, grace))
            info[name] = proc
            if "healthcheck" in svc:
                wait_healthy(name, healthcheck(svc, local, env), env, proc, budget_s=60)
            elif name.startswith("worker"):
                info[f"{name}-health"] = wait_worker_ready(name, proc, ports[6379], budget_s=60)
        info["tmp"] = tmp_path
        yield info
        late = stop_all(procs)
        assert not late, late
    finally:
        stop_all(procs)
        # pytest shows this only when something failed
        for name, *_ in procs:
            sys.stderr.write(f"--- {name}.log\n"
                             + (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:])


@pytest.mark.slow
def test_compose_services_run_jobs_as_local_processes(compose_stack: dict[str, Any],
                                                      tiny_repo: Path,
                                                      mnist_images: np.ndarray) -> None:
    import urllib.request

    import redis
    from prometheus_client.parser import text_string_to_metric_families

    from latentserve.service.client.jobs import JobsClient, state_name
    from latentserve.worker.runtime.pipeline import Pipeline

    ports = compose_stack["ports"]
    procs = {n: compose_stack[n] for n in ("redis", "service", "worker", "worker-cpu")}
    for name in ("worker", "worker-cpu"):  # WORKER_PROVIDER reached the GPU worker
        assert compose_stack[f"{name}-health"]["provider"] == "cpu"
    images = mnist_images[:64]
    local = Pipeline(tiny_repo)
    with JobsClient(f"127.0.0.1:{ports[50051]}", timeout=60) as client:
        job = client.submit_compress("tiny-ae", images, chunk_size=16)
        done = wait_job(client, job.id, procs, budget_s=120)
        assert state_name(done.state) == "succeeded" and done.items_done == 64, done
        codes = [c for _, c in sorted(client.fetch(job.id))]
        assert codes == local.compress("tiny-ae:1", images)

        job = client.submit_sample("tiny-vqvae", 24, seed=7, chunk_size=8, fmt="raw")
        done = wait_job(client, job.id, procs, budget_s=120)
        assert state_name(done.state) == "succeeded" and done.items_done == 24, done
        samples = np.stack([im for _, im in sorted(client.fetch(job.id), key=lambda r: r[0])])
        np.testing.assert_array_equal(samples, local.sample("tiny-vqvae:1", 24, seed=7))

    # the job work is on the workers' /metrics, whichever replica did it
    items: dict[str, float] = {"compress": 0, "sample": 0}
    for name in ("worker", "worker-cpu"):
        port = compose_stack[f"{name}-ports"][WORKER_METRICS]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        for family in text_string_to_metric_families(text.decode()):
            for s in family.samples:
                if s.name == "latentserve_worker_items_total":
                    items[s.labels["op"]] += s.value
    assert items == {"compress": 64, "sample": 24}, items

    # both worker processes joined the queue (their health keys carry their pids), and the
    # service ran no worker of its own
    from latentserve.worker.jobqueue.keys import Keys

    r = redis.Redis(host="127.0.0.1", port=ports[6379])
    health = [k.decode() for k in r.scan_iter(Keys().worker_pattern())]
    for name in ("worker", "worker-cpu"):
        pid = compose_stack[name].pid
        assert any(f"-{pid}-" in k for k in health), (name, pid, health)
    assert not any(f"-{compose_stack['service'].pid}-" in k for k in health)
    # Redis runs with the compose flags: AOF on, in the mounted data folder
    assert r.config_get("appendonly")["appendonly"] == "yes"
    assert r.config_get("dir")["dir"] == str(compose_stack["tmp"] / "redis-data")
    r.close()
