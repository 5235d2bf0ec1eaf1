"""Helpers shared by the benchmark scripts: paths, threads, machine load, tables, JSON output.

Every script puts the repository root on sys.path (bench/ is not a package) and prints a
small table plus one final line `BENCH_JSON {...}` that tools can parse.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Before torch is imported: with OpenMP's default (active, spinning) wait policy, 2 intra-op
# threads on a shared, oversubscribed 2-core machine ran small ops 10-50x slower than with
# PASSIVE (measured here at load ~7); benchmarks must not measure that pathology.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

JSON_TAG = "BENCH_JSON"

# diffusers UNet2DConditionModel arguments: the SD 1.5 UNet (859.5M parameters) and the demo's.
DEMO_UNET: dict[str, Any] = {  # the shape of model/demo.py's UNet, in diffusers terms
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
}

SD15_UNET: dict[str, Any] = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}

# SDXL base's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json): 2,567M parameters.
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def set_threads(n: int) -> int:
    """Fix torch's intra-op threads (and print them): results depend on it."""
    import torch

    torch.set_num_threads(n)
    got = torch.get_num_threads()
    policy = os.environ.get("OMP_WAIT_POLICY")
    print(
        f"torch {torch.__version__}, threads={got}, cpus={os.cpu_count()}, OMP_WAIT_POLICY={policy}"
    )
    return got


def load_average() -> list[float]:
    """1/5/15-minute load averages (the CPU is shared: report them with the figures)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each fn `warmup` times, then `repeats` rounds of all of them in turn (shared noise)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))  # alternate the order too
        for name in names:
            times[name].append(timed(fns[name]))
    return times


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def emit_json(name: str, payload: dict[str, Any]) -> None:
    """The final machine-readable line."""
    record = {"bench": name, "load_avg": load_average(), **payload}
    print(f"{JSON_TAG} {json.dumps(record, sort_keys=True)}", flush=True)


def parse_json_line(stdout: str) -> dict[str, Any]:
    """The payload of the last BENCH_JSON line of a script's output."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(JSON_TAG + " "):
            return json.loads(line[len(JSON_TAG) + 1 :])
    raise ValueError("no BENCH_JSON line in the output")


class EngineDriver:
    """Steps a service.engine.Engine on a thread until stopped, as a worker's engine loop does,
    keeping the UNet row count of every call (benchmarks submit jobs while it runs)."""

    def __init__(self, engine: Any) -> None:
        import threading

        self.engine = engine
        self.rows: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            out = self.engine.step()
            self.rows.extend(rows for rows, _ in out.calls)
            if not out.worked:
                self._stop.wait(out.wait_s or 0.002)  # wait_s: admission is gathering jobs

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
