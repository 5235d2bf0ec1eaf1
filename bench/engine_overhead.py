"""The engine's own cost per UNet call: everything in a step but the UNet itself.

The demo pipeline's UNet is replaced (here only) by a stand-in that returns zeros of the
latents' shape, and its time is subtracted, so what remains is the host work of a step:
gathering rows, per-row coefficients and noise, CFG bookkeeping, the sampler update, progress.
Latents are SD 1.5's at 512x512 (4 x 64 x 64). Rows are 1, 8 and 32 images, all samplers
mixed, unguided (guided rows double the UNet call, not the host work per image); only steps
in the middle of the trajectories are timed (no admission, no decoding). The goal line is
issue 17's: at most 1 ms + 0.02 ms per row.

    .venv/bin/python bench/engine_overhead.py           # 1, 8, 32 rows
    .venv/bin/python bench/engine_overhead.py --quick   # smoke test
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
import torch
from common import emit_json, load_average, median, set_threads, table

SAMPLERS = ("ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "pndm")


def measure(rows: int, side: int, steps: int, timed: int) -> dict[str, float]:
    from model import load_pipeline
    from service.engine import Engine
    from service.engine_types import GenerationRequest

    pipe = load_pipeline("demo", device="cpu")
    unet_s = [0.0]

    def stand_in(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = torch.zeros_like(x)
        unet_s[0] += time.perf_counter() - t0
        return out

    pipe.unet_forward = stand_in  # type: ignore[method-assign]
    engine = Engine(pipe, max_batch=rows)
    for i in range(rows):
        sampler = SAMPLERS[i % len(SAMPLERS)]
        n = min(steps, 50) if sampler == "lcm" else steps
        engine.submit(
            GenerationRequest.of(f"j{i}", prompt=f"p{i % 4}", width=side, height=side,
                                 steps=n, sampler=sampler, seed=i, guidance_scale=1.0)
        )  # fmt: skip
    for _ in range(3):  # admission and warm-up
        engine.step()
    per_step = []
    for _ in range(timed):
        unet_s[0] = 0.0
        t0 = time.perf_counter()
        out = engine.step()
        elapsed = time.perf_counter() - t0
        assert out.calls and sum(r for r, _ in out.calls) == rows and not out.ended
        per_step.append(elapsed - unet_s[0])
    engine.close_admission()
    host = median(per_step) * 1000
    goal = 1.0 + 0.02 * rows
    return {"rows": rows, "host_ms": host, "goal_ms": goal, "ratio": host / goal}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--side", type=int, default=512, help="image side (latent = side / 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="rows 1 and 4, 64 px, few steps")
    args = p.parse_args()
    steps, timed = 60, 20
    if args.quick:
        args.rows, args.side, steps, timed = [1, 4], 64, 12, 4
    set_threads(args.threads)
    print(f"load average at start: {load_average()}")
    results = [measure(r, args.side, steps, timed) for r in args.rows]
    print(f"\nengine host time per UNet call (stand-in UNet), {args.side}x{args.side}, median "
          f"of {timed} steps")  # fmt: skip
    print(table(["rows", "host ms", "goal ms", "host / goal"],
                [[r["rows"], f"{r['host_ms']:.2f}", f"{r['goal_ms']:.2f}", f"{r['ratio']:.2f}"]
                 for r in results]))  # fmt: skip
    print(f"load average at end: {load_average()}")
    emit_json("engine_overhead", {"quick": args.quick, "side": args.side, "results": results})


if __name__ == "__main__":
    main()
