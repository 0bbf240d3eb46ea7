"""The Helm chart, rendered by Helm's own Go SDK (helm-python-sdk), checked against the code and
validated against the Kubernetes API's models (kubernetes client): unknown fields, wrong types and
missing required fields fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from kubernetes import client

from services.registry import SERVICES
from shared.config import HifiConfig, Settings, hash_api_key

CHART = Path(__file__).resolve().parents[1] / "helm" / "hifi"
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str}
CONSUMERS = {"enricher", "deduplicator", "router"}  # with one sender per sink: the consumer-group workers
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}

THREE_SINKS_CONFIG = {
    "tenants": {
        "acme": {"api_keys": [hash_api_key("a")], "sinks": ["hook", "lake", "stream"]},
        "globex": {"api_keys": [hash_api_key("b")], "sinks": ["hook"], "rate_limit": {"events_per_s": 100}},
    },
    "sinks": {
        "hook": {"type": "webhook", "url": "https://h.example.com/x"},
        "lake": {"type": "kafka", "topic": "lake", "bootstrap": "other:9092"},
        "stream": {"type": "redis_stream", "stream": "s"},
    },
    "dedupe": {"backend": "redis", "window_s": 3600},
}
THREE_SINKS: dict[str, Any] = {
    "config": yaml.safe_dump(THREE_SINKS_CONFIG),
    "secrets": {
        "existingSecret": "hifi-secrets",
        "sentryDsnKey": "dsn",
        "readTokenKey": "read",
        "adminTokenKey": "admin",
        "extraEnvFrom": [{"secretRef": {"name": "hifi-signing"}}],
    },
    "ingress": {"enabled": True, "className": "nginx", "tlsSecret": "tls"},
    "serviceMonitor": {"enabled": True},
    "keda": {"enabled": True},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        out = chart.render(values, name="demo", namespace="prod")
    return [d for path, text in out.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def validate_k8s(obj: Any, klass: str, path: str) -> None:
    """Walk the object against the generated API models: every key must exist with the right type."""
    if klass.lower().startswith("list["):
        assert isinstance(obj, list), f"{path}: expected a list"
        for i, item in enumerate(obj):
            validate_k8s(item, klass[5:-1], f"{path}[{i}]")
    elif klass.lower().startswith(("dict(", "dict[")):
        assert isinstance(obj, dict), f"{path}: expected a map"
        for key, item in obj.items():
            validate_k8s(item, klass[5:-1].split(", ", 1)[1], f"{path}.{key}")
    elif klass in PRIMITIVES:
        assert isinstance(obj, PRIMITIVES[klass]), f"{path}: expected {klass}, got {obj!r}"
    else:
        model = getattr(client.models, klass)
        assert isinstance(obj, dict), f"{path}: expected a {klass} object"
        by_json = {v: k for k, v in model.attribute_map.items()}
        for key, item in obj.items():
            assert key in by_json, f"{path}.{key}: no such field in {klass}"
            validate_k8s(item, model.openapi_types[by_json[key]], f"{path}.{key}")


def check_objects(docs: list[dict[str, Any]]) -> None:
    api = client.ApiClient()
    for doc in docs:
        group_version, kind = doc["apiVersion"], doc["kind"]
        if (group_version, kind) in CRDS:
            assert doc["spec"], f"{kind} without spec"
            continue
        klass = f"{group_version.split('/')[-1].capitalize()}{kind}"
        validate_k8s(doc, klass, f"{kind}/{doc['metadata']['name']}")
        api._ApiClient__deserialize(doc, klass)  # the models' own required-field checks


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"].removeprefix("demo-hifi-"): d for d in docs if d["kind"] == kind}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def test_default_values_render_every_service_with_probes_resources_and_config():
    docs = render({})
    check_objects(docs)
    deployments, statefulsets = by_kind(docs, "Deployment"), by_kind(docs, "StatefulSet")
    workloads = {**deployments, **statefulsets}
    # Only the stages with RocksDB state are StatefulSets (a volume per pod); the rest surge a new pod first.
    assert set(deployments) == {"collector", "auditor", "enricher", "router"}
    assert set(statefulsets) == {"deduplicator", "sender-webhook"}
    # The RocksDB dedupe window and delivered ledger keep their volumes: a restart replays only the changelog's tail.
    for name in ("deduplicator", "sender-webhook"):
        stateful = statefulsets[name]
        assert stateful["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        assert not any(v["name"] == "data" for v in stateful["spec"]["template"]["spec"]["volumes"])
    for stateful in statefulsets.values():
        assert by_kind(docs, "Service")[stateful["spec"]["serviceName"].removeprefix("demo-hifi-")]
    for name, workload in workloads.items():
        c = container(workload)
        assert c["args"][0] in SERVICES, name
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert set(env) <= set(Settings.ENV.values()), set(env) - set(Settings.ENV.values())
        assert int(env["HIFI_WEB_PORT"]) == c["ports"][0]["containerPort"]
        assert env["HIFI_BROKER"] == "kafka-kafka-bootstrap:9092" and env["HIFI_CONFIG"] == "/etc/hifi/hifi.yaml"
        spec = workload["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > int(env["HIFI_SHUTDOWN_GRACE_S"])
        assert spec["topologySpreadConstraints"] and spec["securityContext"]["runAsNonRoot"]
    assert set(by_kind(docs, "PodDisruptionBudget")) == set(workloads)
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == set(workloads) - {"auditor"}
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"]["kind"] == workloads[name]["kind"], name
        assert "replicas" not in workloads[name]["spec"], f"{name}: the HPA owns the count, an upgrade would reset it"
    assert workloads["auditor"]["spec"]["replicas"] == 1
    assert all(h["spec"]["maxReplicas"] <= 12 for h in hpas.values()), "never more replicas than partitions"
    job = by_kind(docs, "Job")["topics"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert container(job)["command"] == ["hifi", "topics"]
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["config"]["data"]["hifi.yaml"])
    assert HifiConfig.parse(config).sinks.keys() == {"webhook"}  # what the pods mount is a valid Hifi config
    assert by_kind(docs, "Service")["collector"]["spec"]["ports"][0]["targetPort"] == "web"
    assert not by_kind(docs, "Ingress") and not by_kind(docs, "ScaledObject")


def test_config_from_a_secret_keeps_it_out_of_configmaps():
    docs = render({"configSecret": "hifi-config"})
    check_objects(docs)
    assert not by_kind(docs, "ConfigMap")
    for workload in [
        *by_kind(docs, "Deployment").values(),
        *by_kind(docs, "StatefulSet").values(),
        by_kind(docs, "Job")["topics"],
    ]:
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["config"]["secret"]["secretName"] == "hifi-config"


def test_three_sinks_with_redis_dedupe():
    docs = render(THREE_SINKS)
    check_objects(docs)
    deployments, statefulsets = by_kind(docs, "Deployment"), by_kind(docs, "StatefulSet")
    assert not statefulsets, "with Redis for the window and the ledger no stage carries state: Deployments"
    senders = {n: d for n, d in deployments.items() if n.startswith("sender-")}
    assert set(senders) == {"sender-hook", "sender-lake", "sender-stream"}, "exactly one sender per sink"
    for name, sender in senders.items():
        assert container(sender)["args"] == ["sender", "--sink", name.removeprefix("sender-")]
        assert "replicas" not in sender["spec"], f"{name}: KEDA owns the count"
    env = container(deployments["collector"])["env"]
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_refs["SENTRY_DSN"] == {"name": "hifi-secrets", "key": "dsn"}
    assert set(secret_refs) == {"SENTRY_DSN", "HIFI_READ_TOKEN", "HIFI_ADMIN_TOKEN"}
    assert container(deployments["collector"])["envFrom"] == [{"secretRef": {"name": "hifi-signing"}}]
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == set(senders) and not any(
        n.startswith("sender") for n in by_kind(docs, "HorizontalPodAutoscaler")
    )
    assert scaled["sender-lake"]["spec"]["triggers"][0]["metadata"]["consumerGroup"] == "hifi-sender-lake"
    assert scaled["sender-lake"]["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    workloads = {**deployments, **statefulsets}
    assert set(by_kind(docs, "ServiceMonitor")) == set(workloads)
    assert {n for n in by_kind(docs, "Service") if n.endswith("-metrics")} == {f"{n}-metrics" for n in workloads}
    assert by_kind(docs, "Ingress")["collector"]["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/v1/events"
    assert (
        HifiConfig.parse(yaml.safe_load(by_kind(docs, "ConfigMap")["config"]["data"]["hifi.yaml"])).dedupe.backend
        == "redis"
    )


@pytest.mark.parametrize("values", [{}, THREE_SINKS], ids=["rocksdb", "redis-three-sinks"])
def test_consumers_roll_one_pod_at_a_time_under_their_pod_name_as_static_member(values):
    """Issue 15: a pod (or a container the kubelet restarted, which keeps its pod's name) rejoins under its own
    name; a stateful stage rolls one pod at a time onto its volume, a stateless one surges a new pod first; a
    pod counts as ready only once assigned and restored (/ready), and the collector drains first."""
    docs = render({**values, "membership": {"sessionTimeoutSeconds": 7, "leaveGroupOnStop": "auto"}})
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    consumers = {n: w for n, w in workloads.items() if n in CONSUMERS or n.startswith("sender-")}
    assert CONSUMERS <= set(consumers) and any(n.startswith("sender-") for n in consumers)
    for name, workload in consumers.items():
        if workload["kind"] == "StatefulSet":
            strategy = workload["spec"]["updateStrategy"]
            assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"partition": 0, "maxUnavailable": 1}}, name
        else:
            strategy = workload["spec"]["strategy"]
            assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}, name
        c = container(workload)
        worker_id = next(e for e in c["env"] if e["name"] == "HIFI_WORKER_ID")
        assert worker_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, name
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert Settings.from_env(env).session_timeout_s == 7.0, name  # the chart's value reaches the worker
        # An autoscaled stateful stage leaves on SIGTERM, or each scale-in would stall its partitions a session.
        leaves = "yes" if workload["kind"] == "StatefulSet" else "auto"
        assert env["HIFI_LEAVE_GROUP_ON_STOP"] == leaves, name
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    collector = container(by_kind(docs, "Deployment")["collector"])
    assert not any(e["name"] == "HIFI_WORKER_ID" for e in collector["env"]), "not a consumer: no static member"
    # Endpoints drop the pod before it stops taking requests: no client sees a refused connection mid-rollout.
    assert collector["lifecycle"]["preStop"]["exec"]["command"][:2] == ["sleep", "5"]


def test_a_stateful_stage_with_a_fixed_count_keeps_its_partitions_on_sigterm():
    """Without an autoscaler nothing scales a stateful stage in, so `auto` keeps its partitions for the restart."""
    docs = render({"stages": {"deduplicator": {"autoscaling": {"enabled": False}, "replicas": 3}}})
    dedupe = by_kind(docs, "StatefulSet")["deduplicator"]
    env = {e["name"]: e.get("value") for e in container(dedupe)["env"]}
    assert env["HIFI_LEAVE_GROUP_ON_STOP"] == "auto" and dedupe["spec"]["replicas"] == 3
    assert "deduplicator" not in by_kind(docs, "HorizontalPodAutoscaler")
    forced = render({"membership": {"leaveGroupOnStop": "no"}})  # an explicit choice is kept
    env = {e["name"]: e.get("value") for e in container(by_kind(forced, "StatefulSet")["deduplicator"])["env"]}
    assert env["HIFI_LEAVE_GROUP_ON_STOP"] == "no"


@pytest.mark.parametrize(
    "values, where",
    [
        (
            {"kafka": {"bootstrap": "k:9092", "partitions": 0, "replicationFactor": 3, "minInsyncReplicas": 2}},
            "partitions",
        ),
        ({"config": {"tenants": {}}}, "config"),  # the config is the file's text, not a map to merge into
        ({"config": ""}, "config"),
        ({"stages": {"collector": {"replicas": -1}}}, "replicas"),
        ({"shutdownGraceSeconds": "soon"}, "shutdownGraceSeconds"),
        ({"redis": {"url": "http://redis"}}, "url"),
        ({"colour": "blue"}, "colour"),
        ({"membership": {"leaveGroupOnStop": "sometimes"}}, "leaveGroupOnStop"),
        ({"membership": {"sessionTimeoutSeconds": 1}}, "sessionTimeoutSeconds"),
    ],
)
def test_the_schema_rejects_bad_values(values, where):
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmError) as err:
        chart.validate_schema(values)
    assert where in str(err.value)


def test_the_charts_stages_and_ports_are_the_pipeline_definitions():
    """values.yaml names each stage and its web port for the chart; they must be shared/pipeline.py's."""
    from shared import pipeline

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert list(values["stages"]) == [spec.name for spec in pipeline.STAGES]
    for spec in pipeline.STAGES:
        # A per-sink stage runs one pod per sink, each alone on its pod's network: the first sink's port.
        assert values["stages"][spec.name]["webPort"] == spec.web_port, spec.name


def test_postgres_sink_dsn_comes_from_a_secret_on_its_sender_only():
    config = {
        "tenants": {"acme": {"api_keys": [hash_api_key("a")], "sinks": ["db"]}},
        "sinks": {"db": {"type": "postgres", "dsn_env": "HIFI_PG_DSN", "table": "events"}},
    }
    docs = render(
        {
            "config": yaml.safe_dump(config),
            "secrets": {"sinkEnv": {"HIFI_PG_DSN": {"secret": "hifi-postgres", "key": "dsn"}}},
        }
    )
    check_objects(docs)
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    env = {n: {e["name"]: e for e in container(w)["env"]} for n, w in workloads.items()}
    assert env["sender-db"]["HIFI_PG_DSN"]["valueFrom"] == {"secretKeyRef": {"name": "hifi-postgres", "key": "dsn"}}
    assert not [n for n, e in env.items() if n != "sender-db" and "HIFI_PG_DSN" in e], "the DSN reaches its sender only"
    assert "postgresql://" not in yaml.safe_dump(docs)
    with pytest.raises(Exception, match="sinkEnv"):
        render({"secrets": {"sinkEnv": {"HIFI_PG_DSN": {"secret": "hifi-postgres"}}}})


def test_archive_credentials_come_from_the_secret():
    config = {
        **THREE_SINKS_CONFIG,
        "sinks": {**THREE_SINKS_CONFIG["sinks"], "archive": {"type": "s3_archive", "bucket": "events"}},
    }
    secrets = {**THREE_SINKS["secrets"], "archiveAccessKeyIdKey": "s3-id", "archiveSecretAccessKeyKey": "s3-secret"}
    docs = render({**THREE_SINKS, "config": yaml.safe_dump(config), "secrets": secrets})
    check_objects(docs)
    sender = by_kind(docs, "Deployment")["sender-archive"]
    env = container(sender)["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs["HIFI_ARCHIVE_ACCESS_KEY_ID"] == {"name": "hifi-secrets", "key": "s3-id"}
    assert refs["HIFI_ARCHIVE_SECRET_ACCESS_KEY"] == {"name": "hifi-secrets", "key": "s3-secret"}
