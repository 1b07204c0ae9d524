"""The Helm chart, rendered and checked without a cluster.

Rendering uses Helm's own library (helm-python-sdk binds Helm's Go SDK), so templates,
``values.schema.json`` and ``fail`` messages behave as ``helm install`` would. Output is
checked against the Kubernetes JSON schemas of every version the chart supports
(kubernetes-validate's bundled schemas, used directly so that every error is listed, not
the first per object), and the custom resources against their projects' models (KEDA's
ScaledObject, prometheus-operator's ServiceMonitor).
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pydantic
import referencing
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

from support.procs import ROOT

CHART = ROOT / "deploy" / "helm" / "llama-gguf-inference"
DASHBOARD = ROOT / "deploy" / "grafana" / "llama-gguf-inference.json"
RELEASE = "llm"
NAMESPACE = "inference"

Manifest = dict[str, Any]

# The least a working install sets (what the chart refuses to guess).
MINIMAL: dict[str, Any] = {
    "model": {"repo": "Qwen/Qwen3-8B-GGUF:Q4_K_M"},
    "keys": {"existingSecret": "llm-keys"},
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        out = _merge(out, layer)
    return out


@functools.cache
def chart() -> helm.Chart:
    helm.disable_logging()
    return helm.Chart.load(CHART)


def render(values: dict[str, Any]) -> list[Manifest]:
    """Every object the chart renders for these values (NOTES.txt aside)."""
    rendered = chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert isinstance(doc, dict), f"{path}: not an object"
                objects.append(doc)
    return objects


def render_error(values: dict[str, Any]) -> str:
    """The message Helm refuses these values with (an AssertionError if it renders)."""
    try:
        chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm.HelmError as exc:
        return str(exc)
    raise AssertionError(f"rendered without complaint: {values}")


def find(objects: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    found = [
        o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects named *{name_suffix}"
    return found[0]


def server_container(objects: list[Manifest]) -> Manifest:
    deployment = find(objects, "Deployment", "llama-gguf-inference")
    container: Manifest = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


# The values combinations every check runs over: each axis is what an operator chooses.
AXES: dict[str, dict[str, dict[str, Any]]] = {
    "model": {
        "hub": {"model": {"repo": "Qwen/Qwen3-8B-GGUF:Q4_K_M"}},
        "hub-gated": {
            "model": {
                "repo": "org/private-GGUF",
                "file": "model-Q8_0.gguf",
                "revision": "v2",
                "hfTokenSecret": {"name": "hf", "key": "token"},
                "hfEndpoint": "https://hub.example",
            }
        },
        "claim": {"model": {"existingClaim": "models", "name": "model.gguf", "alias": "m"}},
    },
    "keys": {
        "secret-env": {"keys": {"existingSecret": "llm-keys"}},
        "secret-file": {"keys": {"existingSecret": "llm-keys", "as": "file"}},
        "inline": {"keys": {"apiKeys": "ci:sha256:" + "0" * 64}},
        "no-auth": {"auth": {"enabled": False}},
    },
    "scaling": {
        "one": {},
        "three-redis-url": {
            "replicaCount": 3,
            "redis": {"url": "redis://redis:6379/0"},
            "persistence": {"accessModes": ["ReadWriteMany"]},
        },
        "hpa": {
            "autoscaling": {"kind": "hpa", "minReplicas": 1, "maxReplicas": 8},
            "redis": {"enabled": True},
            "persistence": {"enabled": False},
        },
        "keda": {
            "autoscaling": {
                "kind": "keda",
                "keda": {"serverAddress": "http://prometheus:9090"},
            },
            "redis": {"url": "redis://redis:6379/0"},
            "persistence": {"accessModes": ["ReadWriteMany"]},
        },
        "keda-to-zero": {
            "autoscaling": {
                "kind": "keda",
                "minReplicas": 0,
                "keda": {
                    "serverAddress": "http://prometheus:9090",
                    "activationTriggers": [
                        {
                            "type": "prometheus",
                            "metadata": {
                                "serverAddress": "http://prometheus:9090",
                                "query": 'sum(rate(nginx_ingress_controller_requests{ingress="llm"}[1m]))',
                                "threshold": "1",
                                "activationThreshold": "0",
                            },
                        }
                    ],
                },
            },
            "redis": {"enabled": True},
            "persistence": {"accessModes": ["ReadWriteMany"]},
        },
    },
    "extras": {
        "bare": {"gpu": {"count": 0}, "podDisruptionBudget": {"enabled": False}},
        "everything": {
            "gpu": {"count": 2},
            "server": {
                "ngl": 99,
                "ctx": "8192",
                "parallel": 8,
                "backends": "auto",
                "extraArgs": "--flash-attn on",
                "env": {"CORS_ORIGINS": "https://app.example", "WEBUI": False},
            },
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "tls": [{"hosts": ["llm.example.com"], "secretName": "llm-tls"}],
            },
            "metrics": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "perKey": {"enabled": True, "scrapeKeySecret": {"name": "scrape"}},
            },
            "grafana": {"dashboard": {"enabled": True}},
            "runtimeClassName": "nvidia",
            "podAnnotations": {"example.com/team": "ml"},
        },
    },
}


def combinations() -> Iterator[tuple[str, dict[str, Any]]]:
    """(id, values) for every combination of the axes."""
    for choice in itertools.product(*(axis.items() for axis in AXES.values())):
        yield "/".join(name for name, _ in choice), merge(*(layer for _, layer in choice))


# --- Kubernetes schemas -------------------------------------------------------------


SCHEMAS = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"


def kubernetes_versions() -> list[str]:
    """Every Kubernetes version with bundled schemas, oldest first ("1.25", ...)."""
    found = [
        m.group(1)
        for entry in SCHEMAS.iterdir()
        if (m := re.fullmatch(r"v(\d+\.\d+)\.\d+-local-strict", entry.name))
    ]
    return sorted(found, key=lambda v: tuple(int(p) for p in v.split(".")))


@functools.cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Draft202012Validator:
    folder = SCHEMAS / f"v{version}.0-local-strict"
    # kubernetes-validate's file naming: apps/v1 -> apps-v1, networking.k8s.io/v1 ->
    # networking-v1, v1 -> v1.
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = folder / f"{kind.lower()}-{group}.json"
    if not path.is_file():
        raise LookupError(f"Kubernetes {version} has no {api_version} {kind}")
    schema = json.loads(path.read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    # Both carry their $id (https://kubernetes.io/api/...); the object's refs resolve
    # against it to /api/_definitions.json.
    registry: referencing.Registry[Any] = referencing.Registry().with_resources(
        (document["$id"], referencing.Resource.from_contents(document))
        for document in (schema, definitions)
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def kubernetes_errors(obj: Manifest, version: str) -> list[str]:
    """Every schema error of one object for one Kubernetes version (strict: unknown fields
    are errors); a kind the version does not have is one error."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        validator = _validator(version, obj["kind"], obj["apiVersion"])
    except LookupError as exc:
        return [f"{name}: {exc}"]
    return [
        f"{name}: {'.'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]


# --- custom resources -----------------------------------------------------------------

CUSTOM_MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
}


def _dropped(given: Any, kept: Any, path: str) -> list[str]:
    """Fields of ``given`` the model did not keep: names it does not know (pydantic
    ignores unknown fields, where the API server's structural schema prunes them)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out = []
        for key, value in given.items():
            if key not in kept:
                out.append(f"{path}.{key}: unknown field")
            else:
                out.extend(_dropped(value, kept[key], f"{path}.{key}"))
        return out
    if isinstance(given, list) and isinstance(kept, list):
        return [e for g, k in zip(given, kept) for e in _dropped(g, k, f"{path}[]")]
    return []


def is_custom(obj: Manifest) -> bool:
    return (obj["apiVersion"], obj["kind"]) in CUSTOM_MODELS


def custom_errors(obj: Manifest) -> list[str]:
    """Every error of a KEDA or prometheus-operator object against its project's model."""
    model = CUSTOM_MODELS[(obj["apiVersion"], obj["kind"])]
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    try:
        parsed = model.model_validate(obj)
    except pydantic.ValidationError as exc:
        return [f"{name}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    kept = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return [f"{name}: {e}" for e in _dropped(obj, kept, "")]


def lint(values: dict[str, Any]) -> list[str]:
    """Helm lint's warnings and errors (its info-level advice aside), strict mode."""
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    return [
        f"{m['path']}: {m['error'].strip()}"
        for m in report.get("messages", [])
        if int(m.get("severity", 0)) >= 2
    ]


def values_in(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded
