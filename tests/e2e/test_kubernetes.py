"""deploy/kubernetes, proved offline, as test_compose.py proves the compose file.

1. ``kubectl kustomize`` renders each overlay (cpu, gpu) without a cluster.
2. Every object is valid: Kubernetes' own kinds against the schemas kubernetes-validate
   ships (strict: an unknown field fails), KEDA's against deploy/kubernetes/schemas/keda.json.
3. What the objects say agrees with the code: the streams and consumer group KEDA
   watches are the ones workers read (from ``Keys``, for the prefix, shards and pools the
   worker's env gives); every env var is a setting the process reads, and the env builds
   a valid config; probe and scrape ports are the ones the processes listen on; the
   worker's probe command is a real ``latentserve worker`` flag and exits 0 beside a
   live worker started with the manifest's env; grace periods are ordered; selectors,
   Secrets and volumes line up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to run on


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects, as ``kubectl kustomize`` renders them (offline)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(KUBE / "overlays" / overlay)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [obj] = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    return c


def plain_env(c: dict[str, Any]) -> dict[str, str]:
    """The container's env; a Secret reference reads as ``secret:NAME/KEY``."""
    out = {}
    for e in c["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        out[e["name"]] = f"secret:{ref['name']}/{ref['key']}" if ref else e["value"]
    return out


def test_every_object_validates_offline(objects) -> None:
    import jsonschema
    import kubernetes_validate

    overlay, objs = objects
    keda = json.loads((KUBE / "schemas" / "keda.json").read_text())
    kinds = set()
    for obj in objs:
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(obj, {**keda, "$ref": f"#/{obj['kind']}"})
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert kinds == {"Secret", "PersistentVolumeClaim", "Service", "Deployment",
                     "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication"}, overlay
    for obj in objs:  # Kubernetes' recommended labels on everything
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "version", "component", "part-of", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, (obj["kind"], key)


def test_keda_watches_the_streams_workers_read(objects) -> None:
    from latentserve.worker.config import WorkerConfig

    _, objs = objects
    worker = plain_env(container(one(objs, "Deployment", "latentserve-worker")))
    config = WorkerConfig.from_env({**worker, "REDIS_URL": "redis://redis:6379/0"})
    want = {(stream, config.keys.group) for pool in config.pools
            for stream in config.keys.streams(pool)}
    scaled = one(objs, "ScaledObject", "latentserve-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "latentserve-worker"
    assert scaled["spec"]["minReplicaCount"] == 0  # scale from zero on lag
    by_metric: dict[str, set[tuple[str, str]]] = {"lagCount": set(), "pendingEntriesCount": set()}
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        for metric, seen in by_metric.items():
            if metric in meta:
                seen.add((meta["stream"], meta["consumerGroup"]))
        auth = one(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        for ref in auth["spec"]["secretTargetRef"]:
            secret = one(objs, "Secret", ref["name"])
            assert ref["key"] in secret["stringData"]
    assert by_metric == {"lagCount": want, "pendingEntriesCount": want}


def known_env(cls: Any) -> set[str]:
    """Every variable a settings class reads: its fields' (nested settings' too) and their
    fallbacks, as latentserve.settings derives them."""
    from typing import get_type_hints

    from latentserve.settings import Settings

    hints = get_type_hints(cls)
    out: set[str] = set()
    for f in fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, Settings):
            out |= known_env(kind)
        else:
            out |= {cls.env_name(f.name), *f.metadata.get("fallback_env", ())}
    return out


def test_env_vars_are_settings_and_build_valid_configs(objects, tmp_path) -> None:
    from latentserve.service.server.config import ServiceConfig
    from latentserve.worker.config import WorkerConfig

    _, objs = objects
    service = plain_env(container(one(objs, "Deployment", "latentserve-service")))
    worker = plain_env(container(one(objs, "Deployment", "latentserve-worker")))
    service_vars = known_env(ServiceConfig)
    assert set(service) <= service_vars, set(service) - service_vars
    worker_vars = known_env(WorkerConfig)
    assert set(worker) <= worker_vars, set(worker) - worker_vars
    # Secrets hold the Redis URL; the tokens file is mounted from one.
    assert service["REDIS_URL"] == worker["REDIS_URL"] == "secret:latentserve-redis/url"
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    local = {"REDIS_URL": "redis://redis:6379/0", "LATENTSERVE_AUTH_TOKENS": str(tokens)}
    svc = ServiceConfig.from_env({**service, **local})
    jobs = svc.jobs
    wcfg = WorkerConfig.from_env({**worker, **local})
    # Both sides of the queue agree: same prefix, same shards, so the same key names.
    assert jobs.queue.keys == wcfg.queue.keys and jobs.embedded_worker == "no"
    mount = {m["mountPath"]: m for m in
             container(one(objs, "Deployment", "latentserve-service"))["volumeMounts"]}
    assert str(Path(service["LATENTSERVE_AUTH_TOKENS"]).parent) in mount
    assert svc.models == Path("/models") and wcfg.models == "/models"


def test_probe_and_scrape_ports_are_the_served_ones(objects) -> None:
    from latentserve.service.server.config import ServiceConfig
    from latentserve.worker.config import WorkerConfig

    _, objs = objects
    dep = one(objs, "Deployment", "latentserve-service")
    c = container(dep)
    env = {**plain_env(c), "REDIS_URL": "redis://redis:6379/0",
           "LATENTSERVE_AUTH_TOKENS": "/dev/null"}
    cfg = ServiceConfig.from_env(env)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": cfg.port, "metrics": cfg.metrics_port} and cfg.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": cfg.port}  # grpc.health.v1 on the gRPC port
    notes = dep["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == str(cfg.metrics_port)
    svc = one(objs, "Service", "latentserve")
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == \
        {"grpc": "grpc", "metrics": "metrics"}
    wdep = one(objs, "Deployment", "latentserve-worker")
    w = container(wdep)
    wcfg = WorkerConfig.from_env({**plain_env(w), "REDIS_URL": "redis://redis:6379/0"})
    assert {p["name"]: p["containerPort"] for p in w["ports"]} == {"metrics": wcfg.metrics_port}
    assert wcfg.metrics_host == "0.0.0.0"
    assert wdep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == \
        str(wcfg.metrics_port)
    from latentserve.cli import build_parser

    for probe in ("startupProbe", "livenessProbe"):
        argv = w[probe]["exec"]["command"]
        assert argv[0] == "latentserve"
        args = build_parser().parse_args(argv[1:])
        assert args.command == "worker" and args.check_health


def test_grace_periods_are_ordered_and_selectors_match(objects) -> None:
    from latentserve.service.server.config import ServiceConfig
    from latentserve.worker.config import WorkerConfig

    overlay, objs = objects
    service = one(objs, "Deployment", "latentserve-service")
    worker = one(objs, "Deployment", "latentserve-worker")
    s_env = plain_env(container(service))
    w_env = plain_env(container(worker))
    s_grace = ServiceConfig.from_env({**s_env, "LATENTSERVE_AUTH_TOKENS": "/dev/null"}).grace_s
    wcfg = WorkerConfig.from_env({**w_env, "REDIS_URL": "redis://redis:6379/0"})
    # The kubelet's SIGKILL comes after the process's own grace: a chunk is finished or
    # handed back, calls in flight drain. A chunk in hand is never reclaimed while its
    # worker is still within its grace.
    assert service["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > s_grace + 5
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > \
        wcfg.grace_s + 5
    assert wcfg.heartbeat_s < wcfg.claim_idle_s
    for dep in (service, worker):
        pods = dep["spec"]["template"]["metadata"]["labels"]
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pods.items() and "app.kubernetes.io/version" not in selector
        [pdb] = [p for p in objs if p["kind"] == "PodDisruptionBudget"
                 and p["spec"]["selector"]["matchLabels"] == selector]
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"] == {
            "claimName": "latentserve-models", "readOnly": True}
        for v in volumes.values():
            if "secret" in v:
                one(objs, "Secret", v["secret"]["secretName"])
    svc = one(objs, "Service", "latentserve")
    assert svc["spec"]["selector"] == service["spec"]["selector"]["matchLabels"]
    limits = container(worker)["resources"]["limits"]
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == 1 and wcfg.provider == "cuda"
    else:
        assert "nvidia.com/gpu" not in limits and wcfg.provider == "cpu"


@pytest.mark.queue
def test_the_worker_probe_passes_beside_a_worker_run_with_the_manifest_env(
        redis_url, tiny_repo, wait_until) -> None:
    objs = render("cpu")
    w = container(one(objs, "Deployment", "latentserve-worker"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LATENTSERVE_") and k != "REDIS_URL"}
    # Container -> host: the Secret's URL is the test's Redis, the volume is tiny_repo,
    # the metrics port a free one (its value was checked above).
    env.update(plain_env(w), REDIS_URL=redis_url, LATENTSERVE_MODELS=str(tiny_repo),
               LATENTSERVE_METRICS_PORT="0", LATENTSERVE_METRICS_HOST="127.0.0.1",
               LATENTSERVE_INTRA_OP_THREADS="1", OMP_NUM_THREADS="1")
    probe = [sys.executable, "-m", "latentserve.cli", *w["livenessProbe"]["exec"]["command"][1:]]
    assert subprocess.run(probe, env=env, capture_output=True, timeout=60).returncode == 1
    proc = subprocess.Popen([sys.executable, "-m", "latentserve.cli", *w["command"][1:]],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: subprocess.run(probe, env=env, capture_output=True,
                                          timeout=60).returncode == 0,
                   timeout=90, interval=0.5, what="the worker's liveness probe to pass")
    finally:
        proc.terminate()
        proc.wait(60)
