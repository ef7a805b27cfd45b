"""The Kubernetes manifests (deploy/kubernetes): they render, validate, and run real commands.

Every overlay is rendered with `kubectl kustomize` and each object is checked against the
Kubernetes OpenAPI schemas with kubernetes-validate in strict mode (unknown fields are
errors) for the oldest and newest versions it knows that we support. Beyond the schema, the
things a schema cannot see: every container runs a `verge` sub-command with options that
command really has; the router and stream configs pass Verge's own validators; Services,
PodDisruptionBudgets and probes point at pods and ports that exist; every ConfigMap and
Secret a pod uses is rendered, or is one of the Secrets the operator creates; pods run
unprivileged; the migration Job's code calls a function that exists.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.verge_cli import unknown_options

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install it)"
)

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["dev", "production", "edge-hostnetwork"]
KUBERNETES_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
OPERATOR_SECRETS = {"verge-control", "verge-edge", "verge-router", "verge-stream"}
"""Secrets the base uses but does not contain: the operator creates them (or dev generates)."""
VERGE_IMAGES = ("localhost/verge", "registry.example.com/verge")
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

Doc = dict[str, Any]


@cache
def render(overlay: str) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations")
    done = subprocess.run(
        [kubectl, "kustomize", str(KUBE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def workloads(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, its pod spec) for every Deployment, StatefulSet, DaemonSet and Job."""
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield doc, doc["spec"]["template"]["spec"]


def containers(pod: Doc) -> list[Doc]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def verge_containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for workload, pod in workloads(docs):
        for container in containers(pod):
            if container["image"].startswith(VERGE_IMAGES):
                yield workload, container


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_kubernetes(overlay: str, version: str):
    problems = []
    for doc in render(overlay):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_strict_validation_rejects_an_unknown_field():
    """The check above is worth something: a misspelt field fails it."""
    service = named(render("dev"), "Service", "verge-control")
    broken = {**service, "spec": {**service["spec"], "selectr": {"a": "b"}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_the_verge_namespace(overlay: str):
    for doc in render(overlay):
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "verge", doc["metadata"]["name"]


# -- commands --------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_real_verge_commands(overlay: str):
    seen = set()
    for workload, container in verge_containers(render(overlay)):
        args = container.get("args")
        if args is None:  # python3 -c ... (the migration Job) or chown (hostPath owner)
            continue
        assert not unknown_options(args), f"{workload['metadata']['name']}: verge {args}"
        seen.add(args[0])
    assert seen == {"control", "edge", "router", "stream"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_reference_in_args_is_defined(overlay: str):
    for workload, container in verge_containers(render(overlay)):
        defined = {env["name"] for env in container.get("env", [])}
        for arg in container.get("args", []):
            for name in re.findall(r"\$\((\w+)\)", arg):
                assert name in defined, f"{workload['metadata']['name']}: $({name}) in {arg}"


def test_migration_job_calls_the_control_planes_store_preparation():
    job = named(render("production"), "Job", "verge-migrate")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["python3", "-c"]
    code = compile(command[2], "verge-migrate", "exec")
    server = importlib.import_module("verge.control.server")
    assert "prepare_store" in code.co_names and callable(server.prepare_store)


def test_control_plane_runs_replicated_on_postgresql():
    for overlay in OVERLAYS:
        docs = render(overlay)
        assert named(docs, "Deployment", "verge-control")["spec"]["replicas"] >= 2
        db = next(
            d
            for d in docs
            if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("verge-control-db")
        )
        url = db["data"]["VERGE_DB"]
        assert url.startswith("postgresql://") and ":" not in url.split("://")[1].split("@")[0], (
            "the password goes in PGPASSWORD, not in the URL"
        )


# -- configs the containers read ------------------------------------------------------------


def _config_map_file(docs: list[Doc], prefix: str, key: str) -> str:
    config_map = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix)
    )
    return config_map["data"][key]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_config_passes_the_routers_validation(overlay: str, tmp_path: Path):
    from verge.config.router import load_router_config

    path = tmp_path / "router.yaml"
    path.write_text(_config_map_file(render(overlay), "verge-router", "router.yaml"))
    config = load_router_config(path)
    assert config.nameservers, "without nameservers the router names its listen address (0.0.0.0)"


@pytest.mark.parametrize(
    "source",
    [KUBE / "base" / "stream" / "stream.example.yaml", KUBE / "overlays" / "dev" / "stream.yaml"],
)
def test_stream_config_passes_the_config_validation(source: Path):
    from verge.config import load_config

    settings = load_config(source).stream
    assert settings.data_dir == "/var/lib/verge/stream"  # the mounted volume
    assert all(app.keys for app in settings.apps), "publishing must need a key"


# -- wiring: references, selectors, ports ---------------------------------------------------


def _references(pod: Doc) -> Iterator[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret the pod uses."""
    for container in containers(pod):
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                yield "Secret", source["secretRef"]["name"]
            if "configMapRef" in source:
                yield "ConfigMap", source["configMapRef"]["name"]
        for env in container.get("env", []):
            ref = env.get("valueFrom", {})
            if "secretKeyRef" in ref:
                yield "Secret", ref["secretKeyRef"]["name"]
            if "configMapKeyRef" in ref:
                yield "ConfigMap", ref["configMapKeyRef"]["name"]
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            yield "Secret", volume["secret"]["secretName"]
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_configmap_and_secret_used_is_there(overlay: str):
    docs = render(overlay)
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    generated_secrets = any(d["kind"] == "Secret" for d in docs)
    for workload, pod in workloads(docs):
        for kind, name in _references(pod):
            if kind == "Secret" and name in OPERATOR_SECRETS and not generated_secrets:
                continue  # production: created with kubectl create secret
            assert (kind, name) in present, f"{workload['metadata']['name']} uses {kind} {name}"


def _pods_matching(docs: list[Doc], selector: dict[str, str]) -> list[Doc]:
    return [
        pod
        for workload, pod in workloads(docs)
        if selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_budgets_select_pods_with_their_ports(overlay: str):
    docs = render(overlay)
    for service in (d for d in docs if d["kind"] == "Service"):
        pods = _pods_matching(docs, service["spec"]["selector"])
        assert pods, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            wanted = (port["targetPort"], port.get("protocol", "TCP"))
            offered = {
                (p.get("name"), p.get("protocol", "TCP"))
                for pod in pods
                for c in pod["containers"]
                for p in c.get("ports", [])
            }
            assert wanted in offered, f"{service['metadata']['name']}: no port {wanted}"
    for budget in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert _pods_matching(docs, budget["spec"]["selector"]["matchLabels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_declared_ports(overlay: str):
    for workload, pod in workloads(render(overlay)):
        for container in pod["containers"]:
            names = {p["name"] for p in container.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind, {})
                action = probe.get("httpGet") or probe.get("tcpSocket")
                if action:
                    assert action["port"] in names, f"{workload['metadata']['name']} {kind}"


def test_edges_are_ready_on_healthz_and_drain_before_they_are_killed():
    edge = named(render("production"), "Deployment", "verge-edge")
    pod = edge["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = 3  # seconds a worker gives requests in flight after SIGTERM (README)
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + 5


def test_hostnetwork_overlay_keeps_one_edge_per_node_on_the_nodes_disk():
    docs = render("edge-hostnetwork")
    pod = named(docs, "Deployment", "verge-edge")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    cache_volume = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert set(cache_volume) == {"name", "hostPath"}
    names = {env["name"]: env for env in pod["containers"][0]["env"]}
    assert names["EDGE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert not any(d["kind"] == "Service" and d["metadata"]["name"] == "verge-edge" for d in docs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged(overlay: str):
    for workload, pod in workloads(render(overlay)):
        assert pod["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "add" not in context["capabilities"]
