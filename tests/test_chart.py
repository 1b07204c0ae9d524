"""The Helm chart without a cluster: lint, every values combination rendered by Helm's own
library and validated against the Kubernetes schemas of every supported version (and
KEDA's and prometheus-operator's models), bad values refused with a message naming the
value, and what the rendered pod means (probes, grace period, keys, limits, GPUs).

`make chart` runs this file alone. The rendered pod is run against the real image by
tests/test_chart_pod.py (.ci/image-build).
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import pytest

from support import chart
from support.chart import MINIMAL, Manifest, find, merge, render, render_error, server_container
from support.procs import ROOT

VERSIONS = chart.kubernetes_versions()
COMBINATIONS = dict(chart.combinations())


def env_of(container: Manifest) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


@functools.cache
def _errors_of(document: str) -> tuple[str, ...]:
    """Every error of one rendered object, for every Kubernetes version (cached: most
    objects repeat across combinations)."""
    obj = json.loads(document)
    if chart.is_custom(obj):
        return tuple(chart.custom_errors(obj))
    return tuple(
        f"[{version}] {error}"
        for version in VERSIONS
        for error in chart.kubernetes_errors(obj, version)
    )


def test_supported_kubernetes_versions_are_checked() -> None:
    # Chart.yaml says >=1.25; the bundled schemas go from there to the newest release.
    assert VERSIONS[0] == "1.25" and len(VERSIONS) >= 13, VERSIONS
    assert 'kubeVersion: ">=1.25.0-0"' in (chart.CHART / "Chart.yaml").read_text()


@pytest.mark.parametrize("values", [MINIMAL, COMBINATIONS["claim/secret-file/keda/everything"]])
def test_chart_lints_clean_in_strict_mode(values: dict[str, Any]) -> None:
    assert chart.lint(values) == []


@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
def test_every_values_combination_renders_valid_objects(combination: str) -> None:
    objects = render(COMBINATIONS[combination])
    errors = [e for obj in objects for e in _errors_of(json.dumps(obj, sort_keys=True))]
    assert errors == [], "\n".join(errors)
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service"} <= kinds


def test_schema_check_lists_every_error_for_every_version() -> None:
    """The check itself can fail: two faults in one object are both reported, for every
    version, and an API a version lacks is named."""
    deployment = copy.deepcopy(find(render(MINIMAL), "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["prot"] = 8000
    deployment["spec"]["replicas"] = "two"
    errors = chart.kubernetes_errors(deployment, VERSIONS[0])
    assert len(errors) == 2, errors
    assert any("readinessProbe.httpGet" in e and "prot" in e for e in errors), errors
    assert any("spec.replicas" in e for e in errors), errors
    assert all(len(chart.kubernetes_errors(deployment, v)) == 2 for v in VERSIONS)

    old_hpa: Manifest = {
        "apiVersion": "autoscaling/v2beta2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "x"},
    }
    assert chart.kubernetes_errors(old_hpa, "1.25") == []
    assert "has no autoscaling/v2beta2" in chart.kubernetes_errors(old_hpa, "1.26")[0]


def test_keda_and_service_monitor_checks_catch_faults() -> None:
    objects = render(COMBINATIONS["hub/secret-env/keda/everything"])
    scaled = copy.deepcopy(find(objects, "ScaledObject"))
    assert chart.custom_errors(scaled) == []
    scaled["spec"]["triggers"][0]["metdata"] = scaled["spec"]["triggers"][0].pop("metadata")
    scaled["spec"]["minReplicaCount"] = "none"
    errors = chart.custom_errors(scaled)
    assert any("minReplicaCount" in e for e in errors), errors
    monitor = copy.deepcopy(find(objects, "ServiceMonitor"))
    assert chart.custom_errors(monitor) == []
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert any("intervall: unknown field" in e for e in chart.custom_errors(monitor))


BAD_VALUES = [
    pytest.param({"autoscaling": {"kind": "knative"}}, "/autoscaling/kind", id="kind"),
    pytest.param({"replicaCount": "3"}, "/replicaCount", id="replicas-string"),
    pytest.param({"replicaCount": 0}, "/replicaCount", id="replicas-zero"),
    pytest.param({"gpu": {"count": -1}}, "/gpu/count", id="gpu-negative"),
    pytest.param({"replicaCont": 2}, "replicaCont", id="misspelt-top-level"),
    pytest.param({"model": {"repository": "a/b"}}, "repository", id="misspelt-nested"),
    pytest.param({"model": {"repo": "just-a-name"}}, "/model/repo", id="repo-without-owner"),
    pytest.param({"model": {"name": "/models/x.gguf"}}, "/model/name", id="model-name-path"),
    pytest.param({"keys": {"as": "volume"}}, "/keys/as", id="keys-as"),
    pytest.param({"redis": {"url": "localhost:6379"}}, "/redis/url", id="redis-url-scheme"),
    pytest.param({"server": {"logFormat": "xml"}}, "/server/logFormat", id="log-format"),
    pytest.param({"server": {"parallel": "eight"}}, "/server/parallel", id="parallel"),
    pytest.param({"server": {"env": {"lower": "x"}}}, "/server/env", id="env-name"),
    pytest.param({"drainTimeout": 0}, "/drainTimeout", id="drain-zero"),
    pytest.param({"persistence": {"accessModes": ["RWX"]}}, "/persistence/accessModes", id="mode"),
    pytest.param(
        {"autoscaling": {"keda": {"serverAddress": "prom:9090"}}}, "serverAddress", id="p"
    ),
]


@pytest.mark.parametrize("bad, named", BAD_VALUES)
def test_bad_values_are_refused_by_the_values_schema(bad: dict[str, Any], named: str) -> None:
    message = render_error(merge(MINIMAL, bad))
    assert "values don't meet the specifications of the schema" in message, message
    assert named in message, message


MISSING = [
    pytest.param({}, "model.repo or model.existingClaim is required", id="no-model"),
    pytest.param(
        {"model": {"repo": "a/b"}}, "keys.existingSecret is required", id="no-keys-and-auth-on"
    ),
    pytest.param(
        merge(MINIMAL, {"replicaCount": 2}), "redis.url or redis.enabled is required", id="2-pods"
    ),
    pytest.param(
        merge(MINIMAL, {"autoscaling": {"kind": "hpa"}}),
        "redis.url or redis.enabled is required",
        id="hpa-without-redis",
    ),
    pytest.param(
        merge(
            MINIMAL,
            {
                "autoscaling": {"kind": "keda"},
                "redis": {"enabled": True},
                "persistence": {"enabled": False},
            },
        ),
        "autoscaling.keda.serverAddress is required",
        id="keda-without-prometheus",
    ),
    pytest.param(
        merge(COMBINATIONS["hub/secret-env/keda/bare"], {"autoscaling": {"minReplicas": 0}}),
        "autoscaling.minReplicas 0 needs autoscaling.keda.activationTriggers",
        id="to-zero-without-wake",
    ),
    pytest.param(
        merge(COMBINATIONS["hub/secret-env/hpa/bare"], {"autoscaling": {"minReplicas": 0}}),
        "autoscaling.minReplicas 0 needs autoscaling.kind=keda",
        id="hpa-to-zero",
    ),
    pytest.param(
        merge(MINIMAL, {"replicaCount": 2, "redis": {"url": "redis://r:6379/0"}}),
        "persistence.accessModes must include ReadWriteMany",
        id="shared-rwo-volume",
    ),
    pytest.param(
        merge(MINIMAL, {"redis": {"url": "redis://r:6379/0", "enabled": True}}),
        "redis.url and redis.enabled are both set",
        id="two-redis",
    ),
    pytest.param(
        merge(MINIMAL, {"terminationGracePeriodSeconds": 30}),
        "terminationGracePeriodSeconds must exceed preStopSleep + drainTimeout",
        id="grace-shorter-than-drain",
    ),
    pytest.param(
        merge(MINIMAL, {"keys": {"apiKeys": "a:b"}}),
        "keys.existingSecret and keys.apiKeys are both set",
        id="two-key-sources",
    ),
    pytest.param(
        merge(MINIMAL, {"server": {"env": {"REDIS_URL": "redis://r:6379/0"}}}),
        "server.env.REDIS_URL: the chart sets REDIS_URL from its own values",
        id="env-shadowing-a-value",
    ),
    pytest.param(
        merge(MINIMAL, {"metrics": {"perKey": {"enabled": True}}}),
        "metrics.perKey.scrapeKeySecret.name is required",
        id="per-key-without-scrape-key",
    ),
]


@pytest.mark.parametrize("values, named", MISSING)
def test_missing_or_conflicting_values_fail_naming_the_value(
    values: dict[str, Any], named: str
) -> None:
    assert named in render_error(values)


def test_auth_off_must_be_said_and_then_renders_without_keys() -> None:
    objects = render({"model": {"repo": "a/b"}, "auth": {"enabled": False}})
    env = env_of(server_container(objects))
    assert env["AUTH_ENABLED"] == "false" and "API_KEYS" not in env


def test_probes_mean_what_kubernetes_thinks() -> None:
    objects = render(MINIMAL)
    container = server_container(objects)
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    # Kubernetes counts any 2xx as success: readiness must be /readyz (503 until the model
    # serves), never the platform probe port, whose 204 would count as ready.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    assert [p["containerPort"] for p in container["ports"]] == [8000]
    env = env_of(container)
    drain = int(env["DRAIN_TIMEOUT"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 5
    assert env["DATA_DIR"] == "/data" and env["PORT"] == "8000"


def test_pod_runs_restricted() -> None:
    objects = render(MINIMAL)
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/data", "/tmp", "/dev/shm"} <= mounts


def test_gpus_are_requested_from_the_device_plugin() -> None:
    container = server_container(render(merge(MINIMAL, {"gpu": {"count": 4}})))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["limits"]["memory"] == "32Gi"
    cpu_only = server_container(render(merge(MINIMAL, {"gpu": {"count": 0}})))
    assert "nvidia.com/gpu" not in cpu_only["resources"]["limits"]


def test_keys_from_the_secret_as_environment_or_as_a_reloadable_file() -> None:
    env = env_of(server_container(render(MINIMAL)))
    assert env["API_KEYS"] == {"secretKeyRef": {"name": "llm-keys", "key": "API_KEYS"}}
    objects = render(merge(MINIMAL, {"keys": {"as": "file"}}))
    container = server_container(objects)
    env = env_of(container)
    assert "API_KEYS" not in env
    assert env["AUTH_KEYS_FILE"] == "/etc/llama-gguf-inference/keys/api_keys.txt"
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    keys = next(v for v in pod["volumes"] if v["name"] == "keys")
    assert keys["secret"]["secretName"] == "llm-keys"
    assert keys["secret"]["items"] == [{"key": "API_KEYS", "path": "api_keys.txt"}]
    inline = render({"model": {"repo": "a/b"}, "keys": {"apiKeys": "ci:sha256:" + "1" * 64}})
    secret = find(inline, "Secret", "-keys")
    assert secret["stringData"] == {"API_KEYS": "ci:sha256:" + "1" * 64}
    annotations = find(inline, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/keys" in annotations  # new keys in the environment roll the pods


def test_shared_limits_reach_every_pod() -> None:
    assert "REDIS_URL" not in env_of(server_container(render(MINIMAL)))
    objects = render(COMBINATIONS["hub/secret-env/hpa/bare"])
    assert env_of(server_container(objects))["REDIS_URL"] == (
        "redis://llm-llama-gguf-inference-redis:6379/0"
    )
    redis = find(objects, "Deployment", "-redis")
    service = find(objects, "Service", "-redis")
    assert service["spec"]["selector"] == redis["spec"]["template"]["metadata"]["labels"]
    # The server's Service and Deployment never select the Redis pod.
    server_service = find(objects, "Service", "llama-gguf-inference")
    assert server_service["spec"]["selector"]["app.kubernetes.io/component"] == "server"


def test_autoscaling_on_the_gateways_queue_and_in_flight() -> None:
    hpa_objects = render(COMBINATIONS["hub/secret-env/hpa/bare"])
    assert "replicas" not in find(hpa_objects, "Deployment", "inference")["spec"]
    hpa = find(hpa_objects, "HorizontalPodAutoscaler")
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert names == ["gateway_queue_depth", "gateway_requests_in_flight"]

    keda_objects = render(COMBINATIONS["hub/secret-env/keda-to-zero/bare"])
    scaled = find(keda_objects, "ScaledObject")
    assert scaled["spec"]["minReplicaCount"] == 0
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    assert queries[0] == (
        'sum(gateway_queue_depth{namespace="inference",service="llm-llama-gguf-inference"})'
    )
    assert queries[1].startswith("sum(gateway_requests_in_flight{")
    assert "nginx_ingress_controller_requests" in queries[2]  # the trigger that wakes it
    assert "replicas" not in find(keda_objects, "Deployment", "inference")["spec"]
    assert "replicas" in find(render(MINIMAL), "Deployment")["spec"]


def test_service_monitor_scrapes_metrics_with_a_key_when_series_are_per_key() -> None:
    objects = render(COMBINATIONS["hub/secret-env/one/everything"])
    monitor = find(objects, "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["authorization"]["credentials"] == {"name": "scrape", "key": "METRICS_KEY"}
    assert env_of(server_container(objects))["METRICS_AUTH_ENABLED"] == "true"
    assert monitor["metadata"]["labels"]["release"] == "prom"


def test_dashboard_config_map_is_the_grafana_file() -> None:
    objects = render(COMBINATIONS["hub/secret-env/one/everything"])
    config_map = find(objects, "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(config_map["data"]["llama-gguf-inference.json"])
    assert shipped == json.loads(chart.DASHBOARD.read_text())
    assert shipped["panels"], "an empty dashboard"


def test_chart_defaults_and_the_documented_values() -> None:
    values = chart.values_in(chart.CHART / "values.yaml")
    assert values["gpu"]["count"] == 1 and values["autoscaling"]["kind"] == "none"
    assert values["redis"] == {**values["redis"], "url": "", "enabled": False}
    assert values["metrics"]["serviceMonitor"]["enabled"] is False
    # DEPLOYMENT.md documents every value the SPEC fixes.
    deployment_doc = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    for name in (
        "replicaCount",
        "image.repository",
        "image.tag",
        "model.repo",
        "model.existingClaim",
        "keys.existingSecret",
        "gpu.count",
        "drainTimeout",
        "autoscaling.kind",
        "autoscaling.minReplicas",
        "autoscaling.maxReplicas",
        "redis.url",
        "redis.enabled",
        "metrics.serviceMonitor.enabled",
        "auth.enabled",
    ):
        assert f"`{name}`" in deployment_doc, name
