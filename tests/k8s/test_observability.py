"""The alerts: PrometheusRule's groups pass `promtool check rules`, and `promtool test rules`
shows each alert fires on the situation it names and stays quiet otherwise."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.k8s.kube import PRODUCTION, build, by_kind, require


def _rules(tmp_path: Path, *, annotations: bool = True) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file; without annotations for the
    unit tests (promtool would compare every rendered annotation; `check rules` parses them)."""
    groups = copy.deepcopy(by_kind(build(PRODUCTION), "PrometheusRule")["kairos"]["spec"]["groups"])
    if not annotations:
        for g in groups:
            for r in g["rules"]:
                r.pop("annotations", None)
    path = tmp_path / "kairos-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("promtool"), *args], capture_output=True, text=True, timeout=120)


def test_rules_pass_promtool(tmp_path: Path) -> None:
    out = _promtool("check", "rules", str(_rules(tmp_path)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(
        f'{k}="{v}"' for k, v in {"job": "kairos", "namespace": "kairos", **labels}.items()
    )
    return {"series": f"{name}{{{inner}}}", "values": values}


def _alert(name: str, at: str, labels: dict[str, str] | None) -> dict[str, Any]:
    exp = [] if labels is None else [{"exp_labels": labels}]
    return {"eval_time": at, "alertname": name, "exp_alerts": exp}


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    rules = _rules(tmp_path, annotations=False)
    lag = {"stream": "EVENTS", "consumer": "profile-events"}
    tests = [
        {  # a consumer 80,000 behind for 20 minutes, on two replicas reporting the same lag
            "interval": "1m",
            "input_series": [
                _series("kairos_consumer_lag_messages", {**lag, "pod": "p1"}, "80000x30"),
                _series("kairos_consumer_lag_messages", {**lag, "pod": "p2"}, "80000x30"),
                _series(
                    "kairos_bus_messages_total",
                    {"consumer": "profile-events", "outcome": "ok", "pod": "p1"},
                    "0+500x30",
                ),
            ],
            "alert_rule_test": [
                _alert("KairosConsumerLagHigh", "5m", None),  # not before its 10 minutes
                _alert(
                    "KairosConsumerLagHigh",
                    "20m",
                    {"severity": "warning", "namespace": "kairos", **lag},
                ),
                _alert("KairosConsumerStuck", "20m", None),  # it is handling messages
            ],
        },
        {  # pending messages and nothing handled: stuck
            "interval": "1m",
            "input_series": [
                _series("kairos_consumer_lag_messages", {**lag, "pod": "p1"}, "12x40"),
                _series(
                    "kairos_bus_messages_total",
                    {"consumer": "profile-events", "outcome": "ok", "pod": "p1"},
                    "100x40",
                ),
            ],
            "alert_rule_test": [
                _alert(
                    "KairosConsumerStuck",
                    "35m",
                    {"severity": "critical", "namespace": "kairos", **lag},
                ),
                _alert("KairosConsumerLagHigh", "35m", None),
            ],
        },
        {  # 5% of the gateway's requests fail
            "interval": "1m",
            "input_series": [
                _series(
                    "kairos_http_requests_total",
                    {
                        "service": "gateway",
                        "status": "200",
                        "method": "POST",
                        "route": "/v1/events",
                    },
                    "0+950x20",
                ),
                _series(
                    "kairos_http_requests_total",
                    {
                        "service": "gateway",
                        "status": "503",
                        "method": "POST",
                        "route": "/v1/events",
                    },
                    "0+50x20",
                ),
                _series(
                    "kairos_http_requests_total",
                    {"service": "profile", "status": "200", "method": "GET", "route": "/x"},
                    "0+100x20",
                ),
            ],
            "alert_rule_test": [
                _alert(
                    "KairosHigh5xxRate",
                    "15m",
                    {"severity": "critical", "namespace": "kairos", "service": "gateway"},
                ),
            ],
        },
        {  # dead letters, a pod down, dispatch's backlog, no gateway at all
            "interval": "1m",
            "input_series": [
                _series(
                    "kairos_bus_messages_total",
                    {"consumer": "dispatch-requests", "outcome": "dead", "pod": "d1"},
                    "0 0 0 1 2 3 3 3 3 3",
                ),
                _series(
                    "up", {"container": "decision", "pod": "decision-1"}, "1 1 0 0 0 0 0 0 0 0"
                ),
                _series(
                    "kairos_dispatch_backlog_messages", {"channel": "sms", "pod": "d1"}, "250000x30"
                ),
                _series(
                    "kairos_dispatch_backlog_messages", {"channel": "push", "pod": "d1"}, "10x30"
                ),
            ],
            "alert_rule_test": [
                _alert(
                    "KairosDeadLettersGrowing",
                    "8m",
                    {"severity": "warning", "namespace": "kairos", "consumer": "dispatch-requests"},
                ),
                _alert(
                    "KairosPodDown",
                    "8m",
                    {
                        "severity": "warning",
                        "namespace": "kairos",
                        "job": "kairos",
                        "container": "decision",
                        "pod": "decision-1",
                    },
                ),
                _alert(
                    "KairosDispatchBacklogHigh",
                    "20m",
                    {"severity": "warning", "namespace": "kairos", "channel": "sms"},
                ),
                _alert(
                    "KairosGatewayAbsent",
                    "5m",
                    {"severity": "critical"},
                ),
            ],
        },
    ]
    spec = tmp_path / "kairos-rules-test.yaml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests})
    )
    out = _promtool("test", "rules", str(spec))
    assert out.returncode == 0, out.stdout + out.stderr
