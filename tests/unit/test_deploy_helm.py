"""deploy/helm/llmproxy: the chart, linted and rendered by Helm's own Go SDK (helm-python-sdk, no helm binary),
every rendered object validated, and the default render the same deployment as the Kustomize base."""

from __future__ import annotations

import pytest
import yaml

from tests.kubernetes_schemas import validate_manifest
from tests.support import REPO

helm = pytest.importorskip("helm_python", reason="helm-python-sdk has wheels for x86-64 Linux, macOS and Windows")

CHART = REPO / "deploy" / "helm" / "llmproxy"
KUSTOMIZE = REPO / "deploy" / "kubernetes"
RELEASE = "llmproxy"  # as the README installs it: the objects then have the Kustomize base's names


def render(values: dict | None = None) -> dict[tuple[str, str], dict]:
    """The chart's objects by (kind, name), rendered for release RELEASE in namespace llmproxy."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values or {}, name=RELEASE, namespace="llmproxy")
    objects = [doc for name, text in files.items() if name.endswith(".yaml")
               for doc in yaml.safe_load_all(text) if doc]
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}


def kustomize_base(name: str) -> dict:
    (doc,) = [doc for doc in yaml.safe_load_all((KUSTOMIZE / name).read_text()) if doc]
    return doc


def rendered_config(objects: dict) -> dict:
    return yaml.safe_load(objects["ConfigMap", "llmproxy-config"]["data"]["config.yaml"])


def test_the_chart_lints_without_errors():
    report = helm.lint(str(CHART))
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] > 1], report


@pytest.mark.parametrize("values", [
    {},
    {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    {"autoscaling": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
], ids=["defaults", "service-monitor", "no-hpa-no-pdb"])
def test_every_rendered_object_validates(values):
    objects = render(values)
    assert ("Deployment", "llmproxy") in objects
    for obj in objects.values():
        validate_manifest(obj)


def test_the_default_render_is_the_kustomize_base():
    objects = render()
    assert {kind for kind, _ in objects} == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                                              "HorizontalPodAutoscaler"}
    assert rendered_config(objects) == yaml.safe_load((KUSTOMIZE / "base" / "config.yaml").read_text())

    chart_pod = objects["Deployment", "llmproxy"]["spec"]["template"]["spec"]
    base_pod = kustomize_base("base/deployment.yaml")["spec"]["template"]["spec"]
    (chart_container,), (base_container,) = chart_pod["containers"], base_pod["containers"]
    assert chart_container.pop("image") == "llmproxy:0.1.0" and base_container.pop("image") == "llmproxy"
    assert chart_container == base_container
    for field in ("terminationGracePeriodSeconds", "automountServiceAccountToken", "securityContext", "volumes"):
        assert chart_pod[field] == base_pod[field], field
    base_strategy = kustomize_base("base/deployment.yaml")["spec"]["strategy"]
    assert objects["Deployment", "llmproxy"]["spec"]["strategy"] == base_strategy

    assert objects["HorizontalPodAutoscaler", "llmproxy"]["spec"] == kustomize_base("base/hpa.yaml")["spec"]
    chart_pdb, base_pdb = objects["PodDisruptionBudget", "llmproxy"]["spec"], kustomize_base("base/pdb.yaml")["spec"]
    assert {**chart_pdb, "selector": None} == {**base_pdb, "selector": None}
    assert objects["Service", "llmproxy"]["spec"]["ports"] == kustomize_base("base/service.yaml")["spec"]["ports"]
    monitor = render({"serviceMonitor": {"enabled": True}})["ServiceMonitor", "llmproxy"]
    assert monitor["spec"]["endpoints"] == kustomize_base("servicemonitor.yaml")["spec"]["endpoints"]


def test_the_grace_period_follows_the_shutdown_values_and_the_config_gets_them():
    objects = render({"shutdown": {"timeoutSeconds": 600, "delaySeconds": 10},
                      "config": {"server": {"shutdown_timeout": "1s", "max_connections": 500}}})
    pod = objects["Deployment", "llmproxy"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 10 + 600 + 20
    assert pod["containers"][0]["readinessProbe"]["periodSeconds"] == 10
    server = rendered_config(objects)["server"]
    assert server == {"listen": ":8000", "shutdown_delay": "10s", "shutdown_timeout": "600s", "max_connections": 500}


def test_a_changed_config_changes_the_pod_template():
    def checksum(values: dict) -> str:
        template = render(values)["Deployment", "llmproxy"]["spec"]["template"]
        return template["metadata"]["annotations"]["checksum/config"]
    assert checksum({}) != checksum({"config": {"health_check": {"interval": "10s"}}})


def test_every_secret_env_entry_reads_the_named_secret():
    objects = render({"secret": {"name": "mine", "env": {"VLLM_API_KEY": "vllm", "OTHER": "other"}}})
    (container,) = objects["Deployment", "llmproxy"]["spec"]["template"]["spec"]["containers"]
    refs = {env["name"]: env["valueFrom"]["secretKeyRef"] for env in container["env"]}
    assert refs == {"VLLM_API_KEY": {"name": "mine", "key": "vllm"}, "OTHER": {"name": "mine", "key": "other"}}
