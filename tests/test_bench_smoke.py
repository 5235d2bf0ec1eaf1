"""The benchmark scripts run end to end in their --quick modes (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TAG = "BENCH_JSON "  # bench/common.py's final machine-readable line


def parse_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(TAG)]
    assert lines, f"no {TAG.strip()} line in:\n{stdout[-2000:]}"
    return json.loads(lines[-1][len(TAG) :])


CASES = {
    "unet": ["bench/unet.py", "--quick"],
    # one child process per implementation, as the 2.6 B-parameter run needs
    "sdxl_unet": ["bench/sdxl_unet.py", "--quick"],
    "load_memory": ["bench/load_memory.py", "--quick", "--dtypes", "fp16"],
    "engine": ["bench/engine.py", "--quick"],
    # a burst: also the exhaustive schedule bound (bench/schedule_bound.py)
    "engine:burst": ["bench/engine.py", "--quick", "--workload", "groups", "--burst"],
    "engine_overhead": ["bench/engine_overhead.py", "--quick"],
    "generate": ["bench/generate.py", "--quick"],
    "gpu": ["bench/gpu.py", "--device", "cpu", "--tiny", "--quick", "--no-compile"],
    # redis-server + `ldmserve api` + one demo worker on loopback; ~20 s (two model loads)
    "service": ["bench/service.py", "--quick"],
    # this tree against the commit before the generation contract (needs git history)
    "vs_previous": ["bench/vs_previous.py", "--quick"],
    # redis-server + the queue's two sides in-process; seconds
    "capacity": ["bench/capacity.py", "--quick"],
    # one UNet call over 4 LoRA adapters vs without (tiny UNet)
    "lora": ["bench/lora.py", "--quick"],
    # a mixed-adapter burst: merged one set at a time vs per-row adapters (tiny UNet)
    "lora_workload": ["bench/lora_workload.py", "--quick"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_quick_mode_runs_and_prints_json(name: str) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [sys.executable, *CASES[name]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = parse_json(proc.stdout)
    assert record["bench"] == name.split(":")[0]
    assert record["quick"] is True
    if name == "engine:burst":  # static's schedule is one of those searched
        least = record["schedule_bound"]["least_mean_at_static_wall"]
        assert least is not None and least[0] <= 1 + 1e-9 and least[1] <= 1 + 1e-9
