"""Kubernetes manifests against their schemas, for the tests of deploy/kubernetes and deploy/helm.

Core kinds use kubernetes-validate's schemas, strict (an unknown or misspelt field fails), for the oldest
Kubernetes the manifests claim (1.30: the preStop sleep action) and the newest it knows. A ServiceMonitor is a
CRD those schemas lack: it is checked against the shape the Prometheus Operator requires (as much of it as the
manifests use), with the Kubernetes types it embeds, ObjectMeta and LabelSelector, from the same schemas.
"""

from __future__ import annotations

import jsonschema
import kubernetes_validate
from referencing import Registry, Resource

KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

# monitoring.coreos.com/v1 ServiceMonitor: spec.selector is required (a LabelSelector); each endpoint names a
# Service port and a path; durations are Prometheus's.
K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1."
PROMETHEUS_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"$ref": K8S_DEFS + "ObjectMeta"},
        "spec": {
            "type": "object",
            "required": ["selector"],
            "additionalProperties": False,
            "properties": {
                "selector": {"$ref": K8S_DEFS + "LabelSelector"},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": PROMETHEUS_DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": PROMETHEUS_DURATION},
                    },
                }},
            },
        },
    },
}


def service_monitor_validator() -> jsonschema.Draft202012Validator:
    version = KUBERNETES_VERSIONS[-1]
    definitions = kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    return jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA,
                                           registry=Resource.from_contents(definitions) @ Registry())


def validate_manifest(document: dict) -> None:
    """Raise (kubernetes_validate.ValidationError or jsonschema.ValidationError) unless the object is valid for
    every version of KUBERNETES_VERSIONS."""
    if document["kind"] == "ServiceMonitor":
        service_monitor_validator().validate(document)
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(document, version, strict=True)
