"""Our UNet against diffusers' UNet2DConditionModel at SDXL base's shape (2.6 B parameters).

fp32 on CPU, each implementation in its own child process (two fp32 copies of 2.6 B weights
would need ~21 GB at once): both build the same weights — one seeded normal draw per
diffusers key, in key order — ours mapped to its layout by model.unet_convert and loaded
strictly, diffusers' assigned into its model; SDPA attention on both (diffusers'
AttnProcessor2_0 set explicitly), ours channels_last as the CPU pipeline runs it. Each child
warms up, times `--repeats` forwards of the same input (batch, latent side, 77 x 2048
context, pooled vector and time ids per row, per-row timesteps) and saves its output; the
parent alternates the children `--rounds` times and prints the median time of each, ours /
diffusers, and the max abs difference of the outputs.

    .venv/bin/python bench/sdxl_unet.py                  # latent 64 (512 px), batch 1
    .venv/bin/python bench/sdxl_unet.py --latent 128     # 1024 px: minutes per forward here
    .venv/bin/python bench/sdxl_unet.py --quick          # tiny SDXL-shaped UNet (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
import torch
from common import SDXL_UNET, emit_json, load_average, median, set_threads, table, timed

from model.conditioning import Conditioning

TINY: dict[str, Any] = {
    **SDXL_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 2, 3],
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}


def pooled_dim(config: dict[str, Any]) -> int:
    """Width of the pooled text vector: the added embedding's input minus 6 time ids."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def seeded_state(reference: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Weights for every key of `reference` (built on the meta device), drawn in key order."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in reference.state_dict().items():
        t = torch.randn(p.shape, generator=gen) * 0.02
        if name.endswith("weight") and p.ndim == 1:  # norms around 1
            t += 1.0
        out[name] = t
    return out


def inputs(config: dict[str, Any], batch: int, side: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    size = float(side * 8)
    return {
        "x": torch.randn(batch, 4, side, side, generator=gen),
        "t": torch.linspace(999.0, 1.0, batch),
        "ctx": torch.randn(batch, 77, config["cross_attention_dim"], generator=gen),
        "pooled": torch.randn(batch, pooled_dim(config), generator=gen),
        "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch),
    }


def child(args: argparse.Namespace) -> None:
    """Build one implementation, time it, save its output and print its times as JSON."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    set_threads(args.threads)
    config = TINY if args.quick else SDXL_UNET
    inp = inputs(config, args.batch, args.latent)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    state = seeded_state(ref, seed=0)
    if args.impl == "ours":
        from model.unet import UNetModel
        from model.unet_config_diffusers import unet_config_from_diffusers
        from model.unet_convert import unet_state_dict_from_diffusers
        from model.weights import build_module

        cfg = unet_config_from_diffusers(dict(ref.config), source="bench")
        sd = unet_state_dict_from_diffusers(state, cfg, source="bench")
        del state
        model = build_module(lambda: UNetModel(cfg), sd, what="UNet", source="bench")
        model.use_channels_last()

        def run() -> torch.Tensor:
            cond = Conditioning(inp["ctx"], pooled=inp["pooled"], time_ids=inp["time_ids"])
            with torch.inference_mode():
                return model(inp["x"], inp["t"], cond)
    else:
        ref.load_state_dict(state, strict=True, assign=True)
        del state
        model = ref.eval().requires_grad_(False)
        model.set_attn_processor(AttnProcessor2_0())

        def run() -> torch.Tensor:
            added = {"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}
            with torch.inference_mode():
                return model(
                    inp["x"], inp["t"], encoder_hidden_states=inp["ctx"], added_cond_kwargs=added
                ).sample

    params = sum(t.numel() for t in model.state_dict().values())
    out = run()  # warm-up, and the output compared
    torch.save(out, args.out)
    times = [timed(run) for _ in range(args.repeats)]
    print(json.dumps({"impl": args.impl, "times": times, "params": params}), flush=True)


def run_child(args: argparse.Namespace, impl: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", impl, "--out", str(out)]
    cmd += ["--latent", str(args.latent), "--batch", str(args.batch)]
    cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    cmd += ["--quick"] if args.quick else []
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"{impl} child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per child")
    p.add_argument("--rounds", type=int, default=1, help="ours/diffusers child pairs (alternated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny SDXL-shaped UNet, latent 8")
    p.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.latent = 8
    if args.child:
        args.impl = args.child
        child(args)
        return
    threads = set_threads(args.threads)
    print(f"load average at start: {load_average()}", flush=True)
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    params = 0
    with tempfile.TemporaryDirectory() as tmp:
        outs = {impl: Path(tmp) / f"{impl}.pt" for impl in times}
        for r in range(args.rounds):
            order = ["ours", "diffusers"] if r % 2 == 0 else ["diffusers", "ours"]
            for impl in order:
                record = run_child(args, impl, outs[impl])
                times[impl] += record["times"]
                params = record["params"]
                print(f"round {r}: {impl} {median(record['times']):.3f}s", flush=True)
        diff = (torch.load(outs["ours"]) - torch.load(outs["diffusers"])).abs().max().item()
    m_ours, m_ref = median(times["ours"]), median(times["diffusers"])
    side = f"{args.latent}x{args.latent}"
    print(f"SDXL-shaped UNet: {params / 1e6:.0f}M parameters, fp32, CPU, {threads} threads")
    print(
        table(
            ["latent", "batch", "ours s", "diffusers s", "ours/diffusers", "max|diff|"],
            [[side, args.batch, m_ours, m_ref, m_ours / m_ref, f"{diff:.2e}"]],
        )
    )
    print("goal: ours/diffusers <= 1.00")
    emit_json(
        "sdxl_unet",
        {
            "quick": args.quick,
            "threads": threads,
            "params_m": params / 1e6,
            "latent": args.latent,
            "batch": args.batch,
            "ours_s": m_ours,
            "diffusers_s": m_ref,
            "ratio": m_ours / m_ref,
            "max_abs_diff": diff,
            "ours_all_s": times["ours"],
            "diffusers_all_s": times["diffusers"],
        },
    )


if __name__ == "__main__":
    main()
