"""Reading the Dockerfile, docker-compose and k8s manifests (for tests/test_deploy.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
REDIS_CONF = DEPLOY / "redis.conf"
API_PORT = 8000
IMAGE = "ldmserve"
ENV_NAME = re.compile(r"\bLDMSERVE_[A-Z0-9_]+\b")


# ---------------------------------------------------------------------------- loading


def interpolate(value: Any) -> Any:
    """Resolve compose's ``${VAR:-default}`` / ``${VAR-default}`` to the default (as with no .env)."""
    if isinstance(value, str):
        return re.sub(
            r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value
        )
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def find_doc(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def ldmserve_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            for c in pod_spec(doc)["containers"]:
                if c["image"].split(":")[0].rsplit("/", 1)[-1] == IMAGE:
                    yield doc["metadata"]["name"], c


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile(name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == name]


def final_stage() -> list[tuple[str, str]]:
    """Instructions of the last build stage (the image that runs)."""
    instructions = dockerfile_instructions()
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1] :]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in final_stage():
        if word == "ENV":
            for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', args):
                env[key] = value.strip('"')
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form: {args}"
    return value


def parse_redis_conf(text: str) -> dict[str, str]:
    conf: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf[key.lower()] = value.strip()
    return conf


def seconds(duration: str | int | float) -> float:
    """Compose durations: ``90s``, ``1m30s``, ``2m``; a bare number is seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def ldmserve_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("image", "").split(":")[0].rsplit("/", 1)[-1] == IMAGE or "build" in svc
    }


def command_lines(
    compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> list[tuple[str, list[str]]]:
    """Every ``ldmserve`` argument list the deployment files run, with where it comes from."""
    lines: list[tuple[str, list[str]]] = []
    entrypoint = exec_form(dockerfile("ENTRYPOINT")[-1])
    assert entrypoint == ["ldmserve"], f"ENTRYPOINT must be ['ldmserve'], got {entrypoint}"
    lines.append(("Dockerfile CMD", exec_form(dockerfile("CMD")[-1])))
    for args in dockerfile("HEALTHCHECK"):
        cmd = exec_form(args.split(" CMD ", 1)[1])
        assert cmd[0] == "ldmserve", cmd
        lines.append(("Dockerfile HEALTHCHECK", cmd[1:]))
    for name, svc in ldmserve_services(compose).items():
        assert "entrypoint" not in svc, f"compose {name}: keep the image's ENTRYPOINT"
        lines.append((f"compose {name}", svc.get("command") or ["api"]))
        test = (svc.get("healthcheck") or {}).get("test")
        if test:
            assert test[0] == "CMD" and test[1] == "ldmserve", f"compose {name}: {test}"
            lines.append((f"compose {name} healthcheck", test[2:]))
    for owner, c in ldmserve_containers(k8s):
        assert c.get("command") in (None, ["ldmserve"]), f"k8s {owner}: keep the ENTRYPOINT"
        lines.append((f"k8s {owner}", c.get("args") or ["api"]))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = (c.get(probe) or {}).get("exec", {}).get("command")
            if cmd:
                assert cmd[0] == "ldmserve", f"k8s {owner} {probe}: {cmd}"
                lines.append((f"k8s {owner} {probe}", cmd[1:]))
    return lines
