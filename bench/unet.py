"""Our UNet against diffusers' UNet2DConditionModel with identical weights (fp32, CPU).

Both are built from one random diffusers UNet at the SD 1.5 shape: its state dict is mapped to
our layout with model.unet_convert and loaded with model.weights.build_module. Ours runs as
model.pipeline.Pipeline runs it on CPU: NHWC (`UNetModel.use_channels_last()`; `--layout
default` keeps NCHW, and then shares diffusers' tensors). Diffusers runs as loaded (NCHW);
`--ref-channels-last` adds a diffusers run with its weights and input in channels_last too.
Both use SDPA attention (diffusers' AttnProcessor2_0, set explicitly). Runs are interleaved
(A B B A ...) under torch.inference_mode after a warm-up. Reported: the median time of each,
ours/diffusers of the medians (goal <= 1.00), the median of the per-round ratios (each
round runs both back to back, so it shares the machine's noise), and the max abs difference.

    .venv/bin/python bench/unet.py                 # SD 1.5 shape, latent 32 and 64, batch 2
    .venv/bin/python bench/unet.py --profile       # plus a torch.profiler op table per impl
    .venv/bin/python bench/unet.py --compile       # plus ours through torch.compile (inductor),
                                                   # as compile_unet runs it; compile time printed
    .venv/bin/python bench/unet.py --quick         # tiny UNet, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
import torch
from common import SD15_UNET, emit_json, interleaved, load_average, median, set_threads, table

from model.conditioning import Conditioning

SD15: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "norm_num_groups": 32,
}

TINY: dict[str, Any] = {
    **SD15,
    "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
}


def build_pair(config: dict[str, Any], seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, diffusers') with the same weights; ours shares diffusers' tensors (NCHW)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from model.unet import UNetModel
    from model.unet_config_diffusers import unet_config_from_diffusers
    from model.unet_convert import unet_state_dict_from_diffusers
    from model.weights import build_module

    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**config).eval().requires_grad_(False)
    ref.set_attn_processor(AttnProcessor2_0())  # SDPA, as ours
    cfg = unet_config_from_diffusers(dict(ref.config), source="bench")
    sd = unet_state_dict_from_diffusers(ref.state_dict(), cfg, source="bench")
    ours = build_module(lambda: UNetModel(cfg), sd, what="UNet", source="bench")
    return ours, ref


def profile(name: str, fn: Any, rows: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        fn()
    return f"--- {name} ---\n" + prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=rows
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latents", type=int, nargs="+", default=[32, 64], help="latent sides")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per impl (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--layout",
        choices=["pipeline", "default"],
        default="pipeline",
        help="ours as the CPU pipeline runs it (channels_last), or the default NCHW layout",
    )
    p.add_argument(
        "--ref-channels-last",
        action="store_true",
        help="also time diffusers with channels_last weights and input",
    )
    p.add_argument("--compile", action="store_true", help="also time ours compiled (inductor)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler op table")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--quick", action="store_true", help="tiny UNet, latent 8, 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.latents, args.repeats = [8], 2
    threads = set_threads(args.threads)
    config = TINY if args.quick else SD15
    print(f"load average at start: {load_average()}")

    ours, ref = build_pair(config)
    if args.layout == "pipeline":
        ours.use_channels_last()
    ref_cl = None
    if args.ref_channels_last:
        import copy

        ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    n_params = sum(t.numel() for t in ref.parameters())
    print(f"UNet {config['block_out_channels']}: {n_params / 1e6:.1f}M parameters, fp32, CPU")
    ctx_dim = config["cross_attention_dim"]
    rows, results = [], []
    gen = torch.Generator().manual_seed(1)
    bucketed = None
    if args.compile:
        from model.compiled import BucketedUNet

        bucketed = BucketedUNet(ours, [args.batch])  # one graph per latent side
    for side in args.latents:
        x = torch.randn(args.batch, 4, side, side, generator=gen)
        t = torch.linspace(999.0, 1.0, args.batch)  # per-sample timesteps
        ctx = torch.randn(args.batch, 77, ctx_dim, generator=gen)

        def run_ours(x: torch.Tensor = x, t: torch.Tensor = t, ctx: torch.Tensor = ctx) -> Any:
            with torch.inference_mode():
                return ours(x, t, Conditioning(ctx))

        def run_ref(x: torch.Tensor = x, t: torch.Tensor = t, ctx: torch.Tensor = ctx) -> Any:
            with torch.inference_mode():
                return ref(x, t, encoder_hidden_states=ctx).sample

        fns = {"ours": run_ours, "diffusers": run_ref}
        if bucketed is not None:
            start = time.perf_counter()
            bucketed(x, t, Conditioning(ctx))  # compiles (the warm-up a worker does)
            print(f"{side}x{side}: compiled in {time.perf_counter() - start:.1f}s", flush=True)

            def run_compiled(
                x: torch.Tensor = x,
                t: torch.Tensor = t,
                ctx: torch.Tensor = ctx,
                fn: Any = bucketed,
            ) -> Any:
                return fn(x, t, Conditioning(ctx))

            fns["ours_compiled"] = run_compiled
        if ref_cl is not None:

            def run_ref_cl(
                x: torch.Tensor = x, t: torch.Tensor = t, ctx: torch.Tensor = ctx
            ) -> Any:
                x_cl = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    return ref_cl(x_cl, t, encoder_hidden_states=ctx).sample

            fns["diffusers_cl"] = run_ref_cl
        diff = (run_ours() - run_ref()).abs().max().item()
        times = interleaved(fns, args.repeats, warmup=args.warmup)
        m_ours, m_ref = median(times["ours"]), median(times["diffusers"])
        ratio = m_ours / m_ref
        round_ratio = median(
            [a / b for a, b in zip(times["ours"], times["diffusers"], strict=True)]
        )
        m_ref_cl = median(times["diffusers_cl"]) if ref_cl is not None else None
        m_comp = median(times["ours_compiled"]) if args.compile else None
        if m_comp is not None:
            print(f"{side}x{side}: compiled {m_comp:.3f}s vs eager {m_ours:.3f}s: "
                  f"{m_comp / m_ours:.3f} (per-round median "
                  f"{median([a / b for a, b in zip(times['ours_compiled'], times['ours'], strict=True)]):.3f})")  # fmt: skip
        rows.append(
            [f"{side}x{side}", args.batch, m_ours, m_ref, ratio, round_ratio, f"{diff:.2e}"]
            + ([m_ref_cl, m_ours / m_ref_cl] if m_ref_cl else [])
        )
        print(
            f"{side}x{side}: ours {m_ours:.3f}s diffusers {m_ref:.3f}s ratio {ratio:.3f}"
            f" (per-round median {round_ratio:.3f})"
            + (f", diffusers channels_last {m_ref_cl:.3f}s" if m_ref_cl else ""),
            flush=True,
        )
        results.append(
            {
                "latent": side,
                "batch": args.batch,
                "ours_s": m_ours,
                "diffusers_s": m_ref,
                "ratio": ratio,
                "per_round_ratio_median": round_ratio,
                "diffusers_channels_last_s": m_ref_cl,
                "ours_compiled_s": m_comp,
                "max_abs_diff": diff,
                "ours_all_s": times["ours"],
                "diffusers_all_s": times["diffusers"],
            }
        )
        if args.profile:
            print(profile(f"ours {side}x{side}", run_ours, args.profile_rows))
            print(profile(f"diffusers {side}x{side}", run_ref, args.profile_rows))

    print(
        table(
            ["latent", "batch", "ours s", "diffusers s", "ours/diffusers", "per-round", "max|diff|"]
            + (["diffusers cl s", "ours/diffusers cl"] if ref_cl is not None else []),
            rows,
        )
    )
    print("goal: ours/diffusers <= 1.00")
    emit_json(
        "unet",
        {
            "threads": threads,
            "quick": args.quick,
            "layout": args.layout,
            "params_m": n_params / 1e6,
            "repeats": args.repeats,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
