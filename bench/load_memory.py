"""Peak memory of loading an SD 1.5-shaped single-file checkpoint, ours vs the naive way.

A random-weight checkpoint (UNet ~860M params + SD VAE + CLIP ViT-L text tower, original
single-file key layout) is written once, by its own subprocess, to a temp dir. Each case then
runs in a fresh subprocess that imports torch and the model code, notes its RSS (baseline),
loads, and reports the RSS high-water mark (VmHWM). A sampler thread also records the peak of
anonymous memory (RssAnon: the process's own copies; file pages that safetensors maps are
RssFile and count in VmHWM too). After loading, every weight is read once (as a first
forward would), so weights left memory-mapped by a zero-copy load are counted too.

    ratio = (peak RSS - baseline RSS) / bytes of the loaded weights     goal < 2.0

Cases: ours = model.load_pipeline(path, device="cpu"); naive = safetensors.torch.load_file +
modules built normally (random init) + load_state_dict. Each on an fp32 file and on an fp16
file loaded as fp32.

    .venv/bin/python bench/load_memory.py            # ~4 GB fp32 + ~2 GB fp16 file in /tmp
    .venv/bin/python bench/load_memory.py --quick    # tiny shapes, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
from common import ROOT, emit_json, load_average, table

CASES = ("ours", "naive")


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(rest.split()[0]) * 1024
    return out


def _configs(quick: bool) -> tuple[Any, Any, Any]:
    from model.text import clip_text_config
    from model.unet_config import UNetConfig
    from model.vae import TINY_VAE_CONFIG, VAEConfig

    if quick:
        unet = UNetConfig(
            model_channels=32, channel_mult=(1, 2), attention_levels=(1,), context_dim=64
        )
        return unet, TINY_VAE_CONFIG, clip_text_config(hidden=64, layers=2)
    return UNetConfig(), VAEConfig(), clip_text_config(hidden=768, layers=12)


def write_checkpoint(path: Path, dtype_name: str, quick: bool) -> None:
    """Subprocess body: build random modules and save them in the single-file layout."""
    import torch
    from safetensors.torch import save_file

    from model.text import random_text_encoder
    from model.text_ldm import text_state_dict_to_ldm
    from model.unet import UNetModel
    from model.unet_convert import unet_state_dict_to_ldm
    from model.vae import AutoencoderKL
    from model.vae_convert import vae_state_dict_to_ldm

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    unet_cfg, vae_cfg, text_cfg = _configs(quick)
    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        sd.update(unet_state_dict_to_ldm(UNetModel(unet_cfg).to(dtype)))
        sd.update(vae_state_dict_to_ldm(AutoencoderKL(vae_cfg).to(dtype)))
        sd.update(text_state_dict_to_ldm(random_text_encoder(text_cfg, seed=1, dtype=dtype)))
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, str(path))


def _naive_load(path: Path, quick: bool) -> int:
    """load_file + modules built normally + load_state_dict (three UNet-sized copies at worst)."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from model.unet import UNetModel
    from model.vae import AutoencoderKL

    unet_cfg, vae_cfg, text_cfg = _configs(quick)
    sd = load_file(str(path))
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text": {}}
    for k, v in sd.items():
        for prefix, part in (
            ("model.diffusion_model.", "unet"),
            ("first_stage_model.", "vae"),
            ("cond_stage_model.transformer.", "text"),
        ):
            if k.startswith(prefix):
                parts[part][k.removeprefix(prefix)] = v
    unet = UNetModel(unet_cfg)
    unet.load_state_dict(parts["unet"], strict=True)
    vae = AutoencoderKL(vae_cfg)
    vae.load_state_dict(parts["vae"], strict=True)
    text = CLIPTextModel(text_cfg)
    text.load_state_dict(parts["text"], strict=False)  # position_ids: no checkpoint has them
    del sd, parts
    modules = (unet, vae, text)
    _LOADED.extend(modules)
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def _ours_load(path: Path) -> int:
    from model import load_pipeline

    pipe = load_pipeline(str(path), device="cpu")
    modules = (pipe.unet, pipe.vae, pipe.text.model)
    _LOADED.extend(modules)
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


_LOADED: list[Any] = []


def _touch_all() -> None:
    """Read every weight once (as a first forward would), so lazily mapped pages count."""
    import torch

    with torch.no_grad():
        for module in _LOADED:
            for tensor in module.state_dict().values():
                tensor.sum()


def measure(case: str, path: Path, quick: bool) -> dict[str, Any]:
    """Subprocess body: baseline RSS after imports, then load and read the high-water marks."""
    import torch  # baseline: interpreter + torch + model code imported
    import transformers  # noqa: F401

    import model.checkpoint  # noqa: F401

    torch.set_num_threads(2)
    base = _status()
    peak_anon = [base["RssAnon"]]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    weight_bytes = _ours_load(path) if case == "ours" else _naive_load(path, quick)
    seconds = time.perf_counter() - t0
    _touch_all()  # mmap-backed weights are only resident once read: count them
    stop.set()
    sampler.join()
    end = _status()
    return {
        "case": case,
        "base_rss": base["VmRSS"],
        "peak_rss": end["VmHWM"],
        "peak_anon": max(peak_anon[0], end["RssAnon"]),
        "base_anon": base["RssAnon"],
        "end_rss": end["VmRSS"],
        "weight_bytes": weight_bytes,
        "load_s": seconds,
    }


def _child(args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", type=Path, default=None, help="where to write the file (temp dir)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    p.add_argument("--_write", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--_measure", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._write:
        write_checkpoint(Path(args._write[0]), args._write[1], args.quick)
        return
    if args._measure:
        print(json.dumps(measure(args._measure[0], Path(args._measure[1]), args.quick)))
        return

    print(f"load average at start: {load_average()}")
    work = Path(tempfile.mkdtemp(prefix="ldm-loadmem-", dir=args.dir))
    quick = ["--quick"] if args.quick else []
    gib = 1024**3
    rows, results = [], []
    try:
        print(f"disk free in {work}: {shutil.disk_usage(work).free / gib:.1f} GiB")
        for dtype in args.dtypes:
            path = work / f"sd15-random-{dtype}.safetensors"
            t0 = time.perf_counter()
            _child(["--_write", str(path), dtype, *quick])
            size = path.stat().st_size
            print(f"wrote {path.name}: {size / gib:.2f} GiB in {time.perf_counter() - t0:.0f} s")
            by_case = {}
            for case in CASES:
                r = json.loads(_child(["--_measure", case, str(path), *quick]).splitlines()[-1])
                grown = r["peak_rss"] - r["base_rss"]
                r.update(
                    file=dtype,
                    file_bytes=size,
                    ratio=grown / r["weight_bytes"],
                    ratio_vs_file=grown / size,
                    anon_ratio=(r["peak_anon"] - r["base_anon"]) / r["weight_bytes"],
                )
                by_case[case] = r
                results.append(r)
                rows.append(
                    [
                        f"{dtype} file -> fp32",
                        case,
                        size / gib,
                        r["weight_bytes"] / gib,
                        grown / gib,
                        r["ratio"],
                        r["anon_ratio"],
                        r["load_s"],
                    ]
                )
            by_case["ours"]["vs_naive"] = (
                by_case["ours"]["peak_rss"] - by_case["ours"]["base_rss"]
            ) / (by_case["naive"]["peak_rss"] - by_case["naive"]["base_rss"])
            if not args.keep:
                path.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(
        table(
            [
                "file",
                "loader",
                "file GiB",
                "weights GiB",
                "peak-base GiB",
                "ratio",
                "anon ratio",
                "load s",
            ],
            rows,
        )
    )
    for r in results:
        if r["case"] == "ours":
            print(f"{r['file']}: ours/naive peak growth = {r['vs_naive']:.2f}")
    print("ratio = (peak RSS - baseline RSS) / bytes of the loaded (fp32) weights; goal < 2.0")
    emit_json("load_memory", {"quick": args.quick, "results": results, "pid": os.getpid()})


if __name__ == "__main__":
    main()
