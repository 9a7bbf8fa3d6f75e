"""The kustomizations a platform team deploys: they render with `kubectl kustomize`, every
object validates against the Kubernetes schemas (strict), pods are hardened, every consumer
process scales on its lag, and the network policies allow exactly the flows of DESIGN.md."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.k8s.kube import (
    K8S,
    PROCESSES,
    PRODUCTION,
    build,
    by_kind,
    containers,
    pod_spec,
)

K8S_VERSION = "1.31.0"
# Custom resources: their operators' schemas are not in kubernetes-validate; what Kairos
# relies on in them is asserted below.
CUSTOM = {"ScaledObject", "PodMonitor", "PrometheusRule"}
SECRETS_DIR = "/etc/kairos/secrets"
KUSTOMIZATIONS = [K8S / "base", PRODUCTION, K8S / "backing" / "redis"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_renders_and_validates_strictly(directory: Path) -> None:
    objs = build(directory)
    assert objs
    for o in objs:
        if o["kind"] in CUSTOM:
            continue
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_production_has_every_process_and_component() -> None:
    objs = build(PRODUCTION)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for p in PROCESSES:
        for kind in ("Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"):
            assert (kind, f"kairos-{p}") in kinds
    assert ("Job", "kairos-migrate") in kinds
    assert {"HorizontalPodAutoscaler", "ScaledObject", "NetworkPolicy"} <= {k for k, _ in kinds}
    assert {"PodMonitor", "PrometheusRule"} <= {k for k, _ in kinds}
    assert {o["metadata"].get("namespace") for o in objs} == {"kairos"}


def test_the_migration_can_be_applied_first() -> None:
    """README: `kubectl apply -k ... -l 'app.kubernetes.io/component in (config,migrate)'`."""
    first = {
        (o["kind"], o["metadata"]["name"])
        for o in build(PRODUCTION)
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        in ("config", "migrate")
    }
    assert first == {
        ("ConfigMap", "kairos-config"),
        ("ServiceAccount", "kairos-migrate"),
        ("Job", "kairos-migrate"),
    }


def test_pods_are_hardened() -> None:
    objs = build(PRODUCTION)
    config = by_kind(objs, "ConfigMap")["kairos-config"]["data"]
    assert config["KAIROS_SECRETS_DIR"] == SECRETS_DIR
    workloads = [o for o in objs if pod_spec(o) is not None]
    assert len(workloads) == len(PROCESSES) + 1  # and the migration Job
    for o in workloads:
        name = o["metadata"]["name"]
        pod = pod_spec(o)
        assert pod is not None
        assert pod["automountServiceAccountToken"] is False, name
        sa = by_kind(objs, "ServiceAccount")[pod["serviceAccountName"]]
        assert sa["automountServiceAccountToken"] is False
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in containers(o):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert sc.get("privileged", False) is False, name
            for key in ("cpu", "memory"):
                assert c["resources"]["requests"][key] and c["resources"]["limits"][key], name
            # Pinned by digest, never a tag alone.
            assert "@sha256:" in c["image"] and len(c["image"].split("@sha256:")[1]) == 64
            # Secrets are files from a Secret volume, never environment variables.
            for src in c.get("envFrom", []):
                assert "secretRef" not in src, name
            for env in c.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), name
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts[SECRETS_DIR]["readOnly"] is True
            assert volumes[mounts[SECRETS_DIR]["name"]]["secret"]["secretName"] == "kairos-secrets"
            # A read-only root: /tmp (KAIROS_RUN_DIR) is an emptyDir.
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], name
            assert config["KAIROS_RUN_DIR"].startswith("/tmp/")


def test_deployments_probe_spread_and_keep_a_replica_through_disruptions() -> None:
    objs = build(PRODUCTION)
    pdbs = by_kind(objs, "PodDisruptionBudget")
    for name, d in by_kind(objs, "Deployment").items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert {p["name"] for p in c["ports"]} == {"http"}
        keys = {t["topologyKey"] for t in pod["topologySpreadConstraints"]}
        assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for t in pod["topologySpreadConstraints"]:
            assert _selects(t["labelSelector"], labels)
        pdb = pdbs[name]["spec"]
        assert _selects(pdb["selector"], labels)
        assert pdb.get("maxUnavailable") == 1
        # Two replicas at least: fixed (selection), or the autoscaler's floor, which then
        # owns the count alone (an apply must not reset it).
        floor = _autoscaler_floor(objs, name)
        if floor is None:
            assert d["spec"]["replicas"] >= 2, name
        else:
            assert "replicas" not in d["spec"] and floor >= 2, name


def _autoscaler_floor(objs: list[dict[str, Any]], deployment: str) -> int | None:
    for o in objs:
        if (
            o["kind"] == "HorizontalPodAutoscaler"
            and o["spec"]["scaleTargetRef"]["name"] == deployment
        ):
            return int(o["spec"]["minReplicas"])
        if o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == deployment:
            return int(o["spec"]["minReplicaCount"])
    return None


def test_consumers_scale_on_lag_and_the_request_path_on_cpu() -> None:
    objs = build(PRODUCTION)
    hpas = {
        o["spec"]["scaleTargetRef"]["name"]: o
        for o in objs
        if o["kind"] == "HorizontalPodAutoscaler"
    }
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in objs if o["kind"] == "ScaledObject"}
    assert set(hpas) == {"kairos-gateway", "kairos-decision"}
    assert set(scaled) == {"kairos-profile", "kairos-dispatch", "kairos-feedback"}
    assert not set(hpas) & set(scaled)  # KEDA makes its own HPA: never two on one Deployment
    for hpa in hpas.values():
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert hpa["spec"]["minReplicas"] >= 2
    documented = {
        "natsServerMonitoringEndpoint",
        "account",
        "stream",
        "consumer",
        "lagThreshold",
        "activationLagThreshold",
        "useHttps",
    }
    for target, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert so["spec"]["minReplicaCount"] >= 2  # the PodDisruptionBudget keeps one of two
        lag = [t for t in so["spec"]["triggers"] if t["type"] == "nats-jetstream"]
        assert lag, target
        for t in lag:
            meta = t["metadata"]
            assert set(meta) <= documented, set(meta) - documented
            assert {"natsServerMonitoringEndpoint", "stream", "consumer", "lagThreshold"} <= set(
                meta
            )
            assert int(meta["lagThreshold"]) > 0
            assert all(isinstance(v, str) for v in meta.values())  # KEDA wants strings
            # The consumer belongs to the process it scales (names in shared/bus.py's
            # consumers; test_metrics checks the running process reports each one).
            assert meta["consumer"].startswith(target.removeprefix("kairos-") + "-")


def test_backing_services_match_what_kairos_expects() -> None:
    config = by_kind(build(K8S / "base"), "ConfigMap")["kairos-config"]["data"]
    nats = yaml.safe_load((K8S / "backing" / "nats" / "values.yaml").read_text())
    assert nats["config"]["cluster"]["enabled"] is True
    assert nats["config"]["jetstream"]["enabled"] is True
    assert int(config["KAIROS_STREAM_REPLICAS"]) <= nats["config"]["cluster"]["replicas"] == 3
    pg = yaml.safe_load((K8S / "backing" / "postgres" / "cluster.yaml").read_text())
    assert pg["apiVersion"] == "postgresql.cnpg.io/v1" and pg["kind"] == "Cluster"
    assert pg["spec"]["instances"] == 3
    # The network policies point at what the backing manifests create.
    policies = by_kind(build(PRODUCTION), "NetworkPolicy")
    to_pg = policies["kairos-to-postgres"]["spec"]["egress"][0]["to"][0]
    assert to_pg["podSelector"]["matchLabels"] == {"cnpg.io/cluster": pg["metadata"]["name"]}
    assert (
        to_pg["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        == (pg["metadata"]["namespace"])
    )
    redis = build(K8S / "backing" / "redis")
    sts = by_kind(redis, "StatefulSet")["kairos-redis"]
    conf = by_kind(redis, "ConfigMap")["kairos-redis"]["data"]["redis.conf"]
    assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    to_redis = policies["kairos-to-nats-and-redis"]["spec"]["egress"][1]["to"][0]
    assert _selects(to_redis["podSelector"], sts["spec"]["template"]["metadata"]["labels"])
    assert (
        to_redis["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        == (sts["metadata"]["namespace"])
    )


# -- network policies, evaluated ------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if (
            (op == "In" and value not in e["values"])
            or (op == "NotIn" and has and value in e["values"])
            or (op == "Exists" and not has)
            or (op == "DoesNotExist" and has)
        ):
            return False
    return True


class Peer:
    """A pod (namespace, labels, named ports) or an address outside the cluster."""

    def __init__(
        self,
        namespace: str | None,
        labels: dict[str, str] | None = None,
        ports: dict[str, int] | None = None,
        ip: str | None = None,
    ) -> None:
        self.namespace = namespace
        self.labels = labels or {}
        self.ports = ports or {}
        self.ip = ip

    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace or ""}


def _peer_matches(rule_peer: dict[str, Any], peer: Peer, own_ns: str) -> bool:
    if "ipBlock" in rule_peer:
        if peer.ip is None:
            return False
        block = rule_peer["ipBlock"]
        addr = ipaddress.ip_address(peer.ip)
        if addr not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(addr in ipaddress.ip_network(e) for e in block.get("except", []))
    if peer.ip is not None:
        return False
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], peer.ns_labels()):
            return False
    elif peer.namespace != own_ns:
        return False
    return "podSelector" not in rule_peer or _selects(rule_peer["podSelector"], peer.labels)


def _port_matches(rule: dict[str, Any], port: int, target: Peer) -> bool:
    if "ports" not in rule:
        return True
    for p in rule["ports"]:
        want = p.get("port")
        if want is None or want == port or target.ports.get(str(want)) == port:
            return True
    return False


def _allowed(policies: list[dict[str, Any]], ns: str, src: Peer, dst: Peer, port: int) -> bool:
    """Whether a TCP connection from src to dst:port passes every policy of namespace ns."""

    def direction(pod: Peer, kind: str, other: Peer) -> bool:
        if pod.namespace != ns or pod.ip is not None:
            return True  # outside the namespace these policies govern
        selecting = [
            p
            for p in policies
            if kind in p["spec"].get("policyTypes", [])
            and _selects(p["spec"]["podSelector"], pod.labels)
        ]
        if not selecting:
            return True
        key, peers_key = ("egress", "to") if kind == "Egress" else ("ingress", "from")
        target = dst
        for p in selecting:
            for rule in p["spec"].get(key, []):
                peers = rule.get(peers_key)
                peer_ok = peers is None or any(_peer_matches(rp, other, ns) for rp in peers)
                if peer_ok and _port_matches(rule, port, target):
                    return True
        return False

    return direction(src, "Egress", dst) and direction(dst, "Ingress", src)


PORTS = {
    "gateway": 8080,
    "profile": 8181,
    "selection": 8182,
    "decision": 8183,
    "dispatch": 8184,
    "feedback": 8185,
}


def _kairos(objs: list[dict[str, Any]], name: str) -> Peer:
    o = by_kind(objs, "Deployment" if name != "migrate" else "Job")[f"kairos-{name}"]
    labels = o["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for c in containers(o) for p in c.get("ports", [])}
    return Peer("kairos", labels, ports)


NATS = Peer("nats", {"app.kubernetes.io/name": "nats"})
REDIS = Peer("kairos-data", {"app.kubernetes.io/name": "kairos-redis"})
POSTGRES = Peer("kairos-data", {"cnpg.io/cluster": "kairos-db"})
INGRESS = Peer("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
PROMETHEUS = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})
DNS = Peer("kube-system", {"k8s-app": "kube-dns"})
INTERNET = Peer(None, ip="17.188.143.34")  # a public address (APNs answers on 443)
PRIVATE = Peer(None, ip="10.1.2.3")


def test_network_policies_allow_the_designed_flows_and_nothing_else() -> None:
    objs = build(PRODUCTION)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    deny = by_kind(objs, "NetworkPolicy")["default-deny-all"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    pods = {n: _kairos(objs, n) for n in (*PROCESSES, "migrate")}

    def ok(src: Peer, dst: Peer, port: int) -> bool:
        return _allowed(policies, "kairos", src, dst, port)

    calls = {("gateway", s) for s in PROCESSES if s != "gateway"} | {
        ("decision", "selection"),
        ("selection", "profile"),
        ("selection", "feedback"),
    }
    for src in PROCESSES:
        for dst in PROCESSES:
            if src != dst:
                expected = (src, dst) in calls
                assert ok(pods[src], pods[dst], PORTS[dst]) is expected, (src, dst)
        assert ok(pods[src], NATS, 4222), src
        assert ok(pods[src], REDIS, 6379), src
        assert ok(pods[src], DNS, 53), src
        assert ok(PROMETHEUS, pods[src], PORTS[src]), src  # /metrics
        assert ok(pods[src], POSTGRES, 5432) is (src != "gateway"), src
        assert ok(pods[src], INTERNET, 443) is (src == "dispatch"), src
        assert not ok(pods[src], PRIVATE, 443), src
        assert ok(INGRESS, pods[src], PORTS[src]) is (src == "gateway"), src
    assert ok(pods["migrate"], POSTGRES, 5432)
    assert not ok(pods["migrate"], pods["gateway"], 8080)
    assert not ok(pods["gateway"], NATS, 8222)  # only the client port
    assert ok(pods["dispatch"], INTERNET, 587) and not ok(pods["dispatch"], INTERNET, 25)


def test_every_pod_is_selected_by_a_network_policy() -> None:
    objs = build(PRODUCTION)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    for o in objs:
        if pod_spec(o) is not None:
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert any(_selects(p["spec"]["podSelector"], labels) for p in policies)
