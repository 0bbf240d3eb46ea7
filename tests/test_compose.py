"""docker-compose.yml cannot run here (no Docker engine); check that everything it names exists."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.registry import SERVICES
from shared import pipeline
from shared.cli import main as cli_main
from shared.config import HifiConfig, Settings

ROOT = Path(__file__).resolve().parents[1]


def load_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_real_kafka_and_redis_and_every_service():
    compose = load_compose()["services"]
    assert compose["kafka"]["image"].startswith("apache/kafka:")
    assert compose["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert compose["redis"]["image"].startswith("redis:")
    commands = {name: svc["command"] for name, svc in compose.items() if svc.get("build") == "."}
    assert {c[0] for c in commands.values()} == set(SERVICES)
    config = HifiConfig.load(ROOT / "config" / "hifi.yaml")
    senders = {c[2] for c in commands.values() if c[0] == "sender"}
    assert senders == set(config.sinks), "one sender container per configured sink"
    for name, cmd in commands.items():
        assert cmd[0] in SERVICES, f"{name}: unknown service {cmd[0]}"
        if cmd[0] == "sender":
            assert cmd[1] == "--sink" and cmd[2] in config.sinks
        assert svc_depends_on_healthy(compose[name])
        assert "healthcheck" in compose[name]


def svc_depends_on_healthy(svc: dict) -> bool:
    deps = svc.get("depends_on", {})
    return all(deps.get(d, {}).get("condition") == "service_healthy" for d in ("kafka", "redis"))


def test_compose_settings_are_settings_the_code_reads():
    known = set(Settings.ENV.values())
    for name, svc in load_compose()["services"].items():
        if svc.get("build") != ".":
            continue
        for var in svc["environment"]:
            assert var in known, f"{name}: {var} is not read by shared.config.Settings"


def test_compose_services_run_the_stages_of_the_pipeline_definition_on_their_ports():
    sinks = list(HifiConfig.load(ROOT / "config" / "hifi.yaml").sinks)
    stages = []
    for name, svc in load_compose()["services"].items():
        if svc.get("build") != ".":
            continue
        stage, *rest = svc["command"]
        sink = rest[1] if rest[:1] == ["--sink"] else None
        spec = pipeline.stage(stage)
        assert int(svc["environment"]["HIFI_WEB_PORT"]) == spec.port(sinks, sink), name
        stages.append(stage)
    assert set(stages) == {s.name for s in pipeline.STAGES}


def test_compose_ports_are_unique_and_the_image_entrypoint_is_the_cli():
    services = load_compose()["services"]
    ports = [s["environment"]["HIFI_WEB_PORT"] for s in services.values() if s.get("build") == "."]
    assert len(ports) == len(set(ports))
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["hifi", "run"]' in dockerfile and "USER hifi" in dockerfile
    assert services["demo-sink"]["entrypoint"] == ["hifi", "demo-sink"]
    try:
        cli_main(["demo-sink", "--help"])
    except SystemExit as done:
        assert done.code == 0
