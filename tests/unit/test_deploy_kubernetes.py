"""deploy/kubernetes: every manifest against the Kubernetes schemas, the Kustomize base and overlay, and the
numbers and names that must agree between the manifests, the proxy's config and the proxy itself.

The schemas: tests/kubernetes_schemas.py (kubernetes-validate's, strict, for Kubernetes 1.30 and the newest;
the ServiceMonitor CRD against the shape the Prometheus Operator requires). Kustomize: `kubectl kustomize`
renders base and overlay where kubectl is installed (every rendered object is validated); the structural checks
run everywhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from llmproxy.config import parse_config, parse_listen
from llmproxy.own_endpoints import OWN_ENDPOINTS
from tests.kubernetes_schemas import KUBERNETES_VERSIONS, service_monitor_validator, validate_manifest
from tests.support import REPO

DEPLOY = REPO / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
OVERLAY = DEPLOY / "overlays" / "redis"
KUSTOMIZATIONS = (BASE, OVERLAY)
MANIFESTS = sorted([*BASE.glob("*.yaml"), *OVERLAY.glob("*.yaml"), *DEPLOY.glob("*.yaml")])
NOT_MANIFESTS = {"config.yaml", "kustomization.yaml"}  # the proxy's config; Kustomize's own file
FLUSH_MARGIN = 20  # seconds after the drain to deliver the last usage records and exit


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(path: Path, kind: str) -> dict:
    (doc,) = [doc for doc in documents(path) if doc["kind"] == kind]
    return doc


DEPLOYMENT = one(BASE / "deployment.yaml", "Deployment")
POD = DEPLOYMENT["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
SERVICE = one(BASE / "service.yaml", "Service")
SECRET = one(DEPLOY / "secret.example.yaml", "Secret")
SERVICE_MONITOR = one(DEPLOY / "servicemonitor.yaml", "ServiceMonitor")


def duration(value: str) -> float:
    """Seconds of a config duration such as 5s, 120s or 2m (the forms the manifests use)."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", value).groups()
    return float(number) * {"ms": 0.001, "s": 1, "m": 60}[unit]


# Schemas ------------------------------------------------------------------------------------------------------

MANIFEST_IDS = [str(path.relative_to(DEPLOY)) for path in MANIFESTS if path.name not in NOT_MANIFESTS]


@pytest.mark.parametrize("name", MANIFEST_IDS)
def test_every_manifest_validates_against_the_kubernetes_schemas(name):
    for doc in documents(DEPLOY / name):
        validate_manifest(doc)


def test_the_schema_check_rejects_a_misspelt_field_and_a_wrong_type():
    misspelt = {**DEPLOYMENT, "spec": {**DEPLOYMENT["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[-1], strict=True)
    wrong_type = {**SERVICE, "spec": {**SERVICE["spec"], "ports": [{"name": "http", "port": "eighty"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSIONS[-1], strict=True)


def test_servicemonitor_has_the_shape_the_prometheus_operator_requires():
    validator = service_monitor_validator()
    validator.validate(SERVICE_MONITOR)
    broken = {**SERVICE_MONITOR, "spec": {**SERVICE_MONITOR["spec"], "selector": {"matchLabel": {"a": "b"}}}}
    assert not validator.is_valid(broken), "a misspelt LabelSelector field fails (the Kubernetes type, strict)"
    assert not validator.is_valid({**SERVICE_MONITOR, "spec": {"endpoints": SERVICE_MONITOR["spec"]["endpoints"]}})


def test_servicemonitor_selects_the_service_and_scrapes_a_port_it_has():
    spec = SERVICE_MONITOR["spec"]
    assert spec["selector"]["matchLabels"].items() <= SERVICE["metadata"]["labels"].items()
    service_ports = {port["name"] for port in SERVICE["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in spec["endpoints"]} <= service_ports
    assert {endpoint["path"].encode() for endpoint in spec["endpoints"]} <= OWN_ENDPOINTS.keys()
    assert SERVICE_MONITOR["metadata"]["namespace"] == kustomization(BASE)["namespace"]


# Kustomize ----------------------------------------------------------------------------------------------------


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def resources(directory: Path) -> list[dict]:
    """The objects a kustomization holds before patches: its resources' (bases' included) and generated ones."""
    objects = []
    for entry in kustomization(directory).get("resources", []):
        path = directory / entry
        assert path.exists(), f"{directory.name}: resource {entry} does not exist"
        objects += resources(path) if path.is_dir() else documents(path)
    for generator in kustomization(directory).get("configMapGenerator", []):
        for file in generator["files"]:
            assert (directory / file).is_file(), f"{directory.name}: {file} (configMapGenerator) does not exist"
        if generator.get("behavior", "create") == "create":
            objects.append({"kind": "ConfigMap", "metadata": {"name": generator["name"]}})
    return objects


def pointer(document: dict, path: str):
    """The value at a JSON pointer (raises KeyError/IndexError if it is not there)."""
    value = document
    for part in path.lstrip("/").split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_every_file_a_kustomization_names_exists_and_every_patch_finds_its_target(directory):
    objects = resources(directory)
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    spec = kustomization(directory)
    for generator in spec.get("configMapGenerator", []):
        if generator.get("behavior") == "replace":
            assert ("ConfigMap", generator["name"]) in names, f"replaces {generator['name']}, which no base makes"
    for patch in spec.get("patches", []):
        target = (patch["target"]["kind"], patch["target"]["name"])
        assert target in names, f"a patch targets {target}, which is not among the resources"
        (document,) = [obj for obj in objects if (obj["kind"], obj["metadata"]["name"]) == target]
        for operation in yaml.safe_load(patch["patch"]):
            assert operation["op"] == "replace"
            pointer(document, operation["path"])  # a replace needs the field to exist
    images = {container["image"] for obj in objects if obj["kind"] == "Deployment"
              for container in obj["spec"]["template"]["spec"]["containers"]}
    assert {image["name"] for image in spec.get("images", [])} <= images


def kustomize_major() -> int:
    """The major version of the Kustomize built into kubectl, 0 if there is none (or kubectl is older than 1.21,
    which does not say)."""
    if shutil.which("kubectl") is None:
        return 0
    done = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True, timeout=60)
    match = re.search(r"Kustomize Version: v(\d+)", done.stdout)
    return int(match.group(1)) if match else 0


def kubectl_kustomize(directory: Path) -> list[dict]:
    if kustomize_major() < 4:  # `patches:` with a target, and `labels:`, need Kustomize 4 (kubectl 1.21+)
        pytest.skip("no kubectl with Kustomize 4 or newer: the structural checks above stand in for rendering")
    done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_kustomize_renders_and_every_rendered_manifest_validates(directory):
    rendered = kubectl_kustomize(directory)
    for doc in rendered:
        assert doc["metadata"]["namespace"] == "llmproxy"
        validate_manifest(doc)
    (config_map,) = [doc for doc in rendered if doc["kind"] == "ConfigMap"]
    (deployment,) = [doc for doc in rendered if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "llmproxy"]
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"] != "llmproxy-config"
    assert config_map["data"]["config.yaml"] == (directory / "config.yaml").read_text()


def test_the_redis_overlay_renders_three_replicas_sharing_limits_in_its_redis():
    rendered = kubectl_kustomize(OVERLAY)
    by_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in rendered}
    assert by_name["Deployment", "llmproxy"]["spec"]["replicas"] == 3
    assert by_name["HorizontalPodAutoscaler", "llmproxy"]["spec"]["minReplicas"] == 3
    (config_map,) = [doc for doc in rendered if doc["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    redis_service = by_name["Service", "llmproxy-redis"]
    assert config["rate_limit"]["redis_url"] == f"redis://llmproxy-redis:{redis_service['spec']['ports'][0]['port']}/0"


# What the manifests and the config must agree on ------------------------------------------------------------------


def config_text(directory: Path) -> dict:
    return yaml.safe_load((directory / "config.yaml").read_text())


def test_the_overlay_config_is_the_base_config_plus_rate_limits_in_redis():
    base, overlay = config_text(BASE), config_text(OVERLAY)
    assert overlay.pop("rate_limit")["store"] == "redis"
    assert overlay == base, "the overlay's copy of config.yaml has drifted from the base's"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_the_grace_period_covers_prestop_shutdown_delay_shutdown_timeout_and_a_flush(directory):
    server = config_text(directory)["server"]
    pre_stop = CONTAINER["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + duration(server["shutdown_delay"]) + duration(server["shutdown_timeout"]) + FLUSH_MARGIN
    assert POD["terminationGracePeriodSeconds"] >= needed
    # shutdown_delay covers one readiness period: a prober of /ready sees the 503 before the listener closes.
    assert duration(server["shutdown_delay"]) >= CONTAINER["readinessProbe"]["periodSeconds"]


def test_the_probes_ask_the_proxys_own_endpoints_without_a_key(tmp_path):
    readiness, liveness = CONTAINER["readinessProbe"]["httpGet"], CONTAINER["livenessProbe"]["httpGet"]
    assert (readiness["path"], liveness["path"]) == ("/ready", "/health")
    assert {readiness["path"].encode(), liveness["path"].encode()} <= OWN_ENDPOINTS.keys()
    config = loaded_config(BASE, tmp_path)
    assert config.auth.enabled and {readiness["path"], liveness["path"], "/metrics"} <= set(config.auth.skip_paths)


def test_ports_agree_from_the_config_to_the_service():
    (port,) = CONTAINER["ports"]
    for directory in KUSTOMIZATIONS:
        assert parse_listen(config_text(directory)["server"]["listen"])[1] == port["containerPort"]
    probes = (CONTAINER["readinessProbe"], CONTAINER["livenessProbe"])
    assert {probe["httpGet"]["port"] for probe in probes} == {port["name"]}
    assert {p["targetPort"] for p in SERVICE["spec"]["ports"]} == {port["name"]}


def test_every_selector_matches_the_pods():
    pod_labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"].items()
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= pod_labels
    assert SERVICE["spec"]["selector"].items() <= pod_labels
    assert one(BASE / "pdb.yaml", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels
    hpa = one(BASE / "hpa.yaml", "HorizontalPodAutoscaler")["spec"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) == ("Deployment", "llmproxy")
    assert hpa["minReplicas"] <= DEPLOYMENT["spec"]["replicas"] <= hpa["maxReplicas"]


def secret_references() -> list[tuple[str, str]]:
    """(secret name, key) of every Secret key the pod reads: env secretKeyRefs and secret volume items."""
    refs = [(env["valueFrom"]["secretKeyRef"]["name"], env["valueFrom"]["secretKeyRef"]["key"])
            for env in CONTAINER.get("env", []) if "secretKeyRef" in env.get("valueFrom", {})]
    refs += [(volume["secret"]["secretName"], item["key"])
             for volume in POD["volumes"] if "secret" in volume for item in volume["secret"]["items"]]
    return refs


def test_every_secret_key_the_pod_reads_is_in_the_example_secret():
    assert secret_references(), "the pod reads the Secret"
    for name, key in secret_references():
        assert name == SECRET["metadata"]["name"] and key in SECRET["stringData"], (name, key)


def test_the_config_file_and_keys_file_are_where_the_volumes_put_them():
    mounts = {mount["name"]: mount["mountPath"] for mount in CONTAINER["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in POD["volumes"]}
    args = CONTAINER["args"]
    assert args[:2] == ["serve", "--config"]
    assert args[2] == f"{mounts['config']}/{kustomization(BASE)['configMapGenerator'][0]['files'][0]}"
    assert volumes["config"]["configMap"]["name"] == kustomization(BASE)["configMapGenerator"][0]["name"]
    (item,) = volumes["secrets"]["secret"]["items"]
    for directory in KUSTOMIZATIONS:
        assert config_text(directory)["auth"]["keys_file"] == f"{mounts['secrets']}/{item['path']}"


def loaded_config(directory: Path, keys_dir: Path):
    """The config as the pod loads it: ${VAR}s from the Deployment's env (the example Secret's values), the keys
    file from the example Secret. Raises ConfigError as the proxy would."""
    data = config_text(directory)
    env = {entry["name"]: SECRET["stringData"][entry["valueFrom"]["secretKeyRef"]["key"]]
           for entry in CONTAINER["env"] if "secretKeyRef" in entry.get("valueFrom", {})}
    env.update({entry["name"]: entry["value"] for entry in CONTAINER["env"] if "value" in entry})
    text = (directory / "config.yaml").read_text()
    assert set(re.findall(r"\$\{(\w+)", text)) <= env.keys(), "every ${VAR} of the config is in the pod's env"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        (keys_dir / "keys.yaml").write_text(SECRET["stringData"]["keys.yaml"])
        data["auth"]["keys_file"] = str(keys_dir / "keys.yaml")
        return parse_config(data, source=str(directory / "config.yaml"))


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_the_config_loads_with_the_example_secret(directory, tmp_path):
    config = loaded_config(directory, tmp_path)
    assert config.backends[0].api_key == SECRET["stringData"]["VLLM_API_KEY"]
    assert len(config.auth.keys) == len(yaml.safe_load(SECRET["stringData"]["keys.yaml"])["keys"])
