"""`ldmserve up | api | worker | generate | health`: the command line.

Settings come from `LDMSERVE_*` variables (service.settings.Settings); a flag given on the
command line overrides its variable. `api` never imports torch, so the API container starts
fast; `worker` and `generate` import the model lazily.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

from service.settings import Settings

log = logging.getLogger("ldmserve")

DEMO_NOTE = (
    "serving the built-in demo model: tiny random weights, so images are noise. "
    "Point ldmserve at a real checkpoint with --model /path/to/model.safetensors, "
    "a diffusers folder or a Hugging Face repo id (e.g. --model stable-diffusion-v1-5/stable-diffusion-v1-5)"
)


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI; tests check deploy/ manifests against it."""
    parser = argparse.ArgumentParser(prog="ldmserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("LDMSERVE_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="embedded Redis + API + one worker per GPU (or one on CPU)")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--data-dir", dest="data_dir")
    up.add_argument("--model")
    up.add_argument("--device")
    up.add_argument("--max-batch", dest="max_batch", type=int)

    api = sub.add_parser("api", help="the HTTP API (no torch; scale it independently)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)

    worker = sub.add_parser("worker", help="a GPU worker: claims jobs and runs the engine")
    worker.add_argument("--model")
    worker.add_argument("--device")
    worker.add_argument("--max-batch", dest="max_batch", type=int)

    gen = sub.add_parser("generate", help="generate images locally, no service")
    gen.add_argument("--model", default=None)
    gen.add_argument("--device")
    add_generation_flags(gen)
    gen.add_argument("--out", default="out.png", help="PNG path; image i>0 gets a -i suffix")

    health = sub.add_parser("health", help="exit 0 if the api answers /healthz or a worker beats")
    health.add_argument("role", choices=["api", "worker"])
    return parser


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of the generation contract (`--image`/`--mask` take file paths)."""
    from service.contract import IMAGE_FIELDS, GenerationParams

    for name, info in GenerationParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        doc = (info.description or "").replace("%", "%%")  # argparse formats help with %
        if name == "loras":
            parser.add_argument(
                flag, action="append", type=lora_flag, metavar="NAME[:SCALE]",
                help="a LoRA adapter in LDMSERVE_LORA_DIR (repeat for more)",
            )  # fmt: skip
            continue
        if name in IMAGE_FIELDS:
            what = doc.split(":")[0]  # the contract's text up to its HTTP encoding
            parser.add_argument(flag, metavar="PATH", help=f"{what}: a PNG, JPEG or WebP file")
            continue
        kind = info.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=info.default)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), default=info.default, help=doc)
        else:
            parser.add_argument(
                flag, type=kind, required=info.is_required(), default=info.default, help=doc
            )


def lora_flag(value: str) -> dict[str, Any]:
    """`--loras NAME[:SCALE]` as the contract's {"name", "scale"}."""
    name, _, scale = value.rpartition(":") if ":" in value else (value, "", "")
    try:
        return {"name": name, "scale": float(scale) if scale else 1.0}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME or NAME:SCALE") from None


def settings_from(args: argparse.Namespace) -> Settings:
    """Environment settings with the flags that were given laid over them."""
    names = ("host", "port", "data_dir", "model", "device", "max_batch")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return Settings(**overrides)


def cmd_api(settings: Settings) -> int:
    import uvicorn

    from service.api import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


def cmd_worker(settings: Settings) -> int:
    from model import load_pipeline
    from service.warm_up import warm_up
    from service.worker import serve

    if settings.model == "demo":
        log.info(DEMO_NOTE)
    pipeline = load_pipeline(
        settings.model, device=settings.device, lora_dir=settings.lora_dir,
        embeddings_dir=settings.embeddings_dir,
    )  # fmt: skip
    pipeline.lora_cache_bytes = settings.lora_cache_mb << 20
    costs = warm_up(pipeline, settings)
    asyncio.run(serve(settings, pipeline, call_costs=costs))
    return 0


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from model import load_pipeline

    source = args.model or settings.model
    if source == "demo":
        log.info(DEMO_NOTE)
    from PIL import Image

    from service.contract import IMAGE_FIELDS, GenerationParams

    fields = {
        name: getattr(args, name)
        for name in GenerationParams.model_fields
        if name not in IMAGE_FIELDS and getattr(args, name) is not None
    }
    from pydantic import ValidationError

    from model.pipeline import GenerationError

    try:
        params = GenerationParams(**fields)  # the same checks as the API's, before loading
        images_in = {}
        for name in IMAGE_FIELDS:
            path = getattr(args, name)
            if path is not None:
                with Image.open(path) as im:
                    images_in[name] = im.convert("L" if name == "mask" else "RGB")
    except (ValidationError, OSError) as exc:
        print(f"ldmserve generate: error: {exc}", file=sys.stderr)
        return 2
    pipe = load_pipeline(
        source, device=args.device or settings.device, lora_dir=settings.lora_dir,
        embeddings_dir=settings.embeddings_dir,
    )  # fmt: skip
    start = time.perf_counter()
    seed = params.seed or 0
    kwargs = params.model_dump(exclude=set(IMAGE_FIELDS)) | {"seed": seed} | images_in
    try:
        images = pipe.generate(**kwargs)
    except GenerationError as exc:
        print(f"ldmserve generate: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    for i, image in enumerate(images):
        path = out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height}, seed {seed + i})")
    print(f"{len(images)} image(s) in {time.perf_counter() - start:.1f}s")
    return 0


def pid1_api_flags(cmdline: Path = Path("/proc/1/cmdline")) -> dict[str, Any]:
    """`--host`/`--port` given to `ldmserve api` when it is PID 1 (a container's entrypoint).

    The image's HEALTHCHECK runs beside the server with only its environment, so without these
    `docker run ldmserve:latest api --port 9000` would be probed on LDMSERVE_PORT (8000).
    Anything else as PID 1 (an init, systemd, another command) gives no flags.
    """
    try:
        argv = [a.decode() for a in cmdline.read_bytes().split(b"\0") if a]
    except (OSError, UnicodeDecodeError):
        return {}
    # The console script runs under its interpreter: [python] /opt/venv/bin/ldmserve api ...
    starts = [i for i, a in enumerate(argv[:2]) if Path(a).name == "ldmserve"]
    if not starts or "api" not in argv[starts[0] + 1 :]:
        return {}
    try:
        args, _ = build_parser().parse_known_args(argv[starts[0] + 1 :])
    except SystemExit:  # argparse's way to refuse; the server would not have started either
        return {}
    if args.command != "api":
        return {}
    return {n: getattr(args, n) for n in ("host", "port") if getattr(args, n) is not None}


def cmd_health(role: str, settings: Settings) -> int:
    """Container health probe: the API answers /healthz; a worker's heartbeat key lives."""
    if role == "api":
        import httpx

        settings = settings.model_copy(update=pid1_api_flags())
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        try:
            return (
                0
                if httpx.get(f"http://{host}:{settings.port}/healthz", timeout=3).is_success
                else 1
            )
        except httpx.HTTPError:
            return 1
    import redis

    url = settings.redis_url or "redis://127.0.0.1:6379/0"
    cluster = settings.redis_cluster
    client = (redis.RedisCluster if cluster else redis.Redis).from_url(url, socket_timeout=3)
    from service.queue.keys import Keys

    keys = Keys.for_settings(settings.key_prefix, settings.redis_cluster)
    mine = f"{socket.gethostname()}-"  # worker ids are <hostname>-<pid>-<random>
    try:
        ids = [w.decode() for w in client.zrange(keys.workers, 0, -1)]
        live = [w for w in ids if w.startswith(mine) and client.exists(keys.worker(w))]
        return 0 if live else 1
    except redis.RedisError:
        return 1
    finally:
        client.close()


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def cmd_up(settings: Settings) -> int:
    """Everything on one machine; Ctrl-C (or SIGTERM) stops every child cleanly."""
    from service.redis_server import start_embedded

    redis_server = None
    env = dict(os.environ)
    if settings.redis_url is None:
        redis_server = start_embedded(settings.data_dir)
        env["LDMSERVE_REDIS_URL"] = redis_server.url
        log.info("embedded Redis at %s (data in %s)", redis_server.url, settings.data_dir / "redis")
    for name in ("host", "port", "model", "max_batch", "data_dir"):
        env[f"LDMSERVE_{name.upper()}"] = str(getattr(settings, name))
    if settings.model == "demo":
        log.info(DEMO_NOTE)
    exe = [sys.executable, "-m", "service.cli"]
    children = [subprocess.Popen([*exe, "api"], env=env)]
    gpus = 0 if settings.device not in (None, "cuda") else visible_gpus()
    for i in range(max(1, gpus)):
        worker_env = dict(env)
        if gpus:
            worker_env["CUDA_VISIBLE_DEVICES"] = str(i)
        if settings.device:
            worker_env["LDMSERVE_DEVICE"] = settings.device
        children.append(subprocess.Popen([*exe, "worker"], env=worker_env))
    log.info("API on http://%s:%d  (docs: /docs)  workers: %d", settings.host, settings.port,
             len(children) - 1)  # fmt: skip

    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    log.error("child %s exited with %s; stopping", child.args, child.returncode)
                    stopping, code = True, 1
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.drain_timeout_s + 10
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        if redis_server is not None:
            redis_server.stop()
        log.info("stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    settings = settings_from(args)
    if args.command == "api":
        return cmd_api(settings)
    if args.command == "worker":
        return cmd_worker(settings)
    if args.command == "generate":
        return cmd_generate(args, settings)
    if args.command == "health":
        return cmd_health(args.role, settings)
    return cmd_up(settings)


if __name__ == "__main__":
    sys.exit(main())
