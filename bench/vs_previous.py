"""This tree against an earlier commit, same work, same run: did a change slow things down?

Both trees run the same measurements in their own child processes, alternating round by round
(this machine's speed drifts by tens of percent within minutes), and the table prints the
median of the per-round ratios (this tree / the earlier commit; below 1 is faster):

- `unet`: one UNet forward at the SD 1.5 shape (859.5M parameters, random weights, fp32,
  channels_last on CPU as the pipeline runs it), batch 2, latent `--latent`.
- `generate`: `load_pipeline("demo").generate()` for a guided 128x128, 20-step job.
- `engine`: the continuous-batching engine over the demo model, 12 mixed jobs (4 samplers,
  2 sizes, guided and not) submitted at once and stepped until idle.

The earlier tree is exported with `git archive` (default: the commit before the generation
contract reshaped the core), so it needs the repository's history.

    .venv/bin/python bench/vs_previous.py                      # against 14aff67, 5 rounds
    .venv/bin/python bench/vs_previous.py --rev HEAD~3 --rounds 3
    .venv/bin/python bench/vs_previous.py --quick              # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import common
from common import emit_json, load_average, median, table

BASELINE_REV = "14aff67"  # main before issue 10 (one conditioning path, engine by value)

# Runs inside each tree (cwd = that tree); prints one JSON line of seconds per measure.
# Written against both APIs: UNet(x, t, context) then (x, t, Conditioning); engine with
# callbacks + flush_callbacks then step() -> StepOutput.
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import model, service
assert model.__file__.startswith(os.getcwd()) and service.__file__.startswith(os.getcwd())
import torch
torch.set_num_threads(int(sys.argv[1]))
quick, latent = sys.argv[2] == "1", int(sys.argv[3])
from model import load_pipeline
from model.unet import UNetConfig, UNetModel  # both trees: the earlier one has no unet_config
from service.engine import Engine
from service import engine_types as et

def best(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return min(times)

out = {}
cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_heads=4,
                 context_dim=32) if quick else UNetConfig()
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    unet = UNetModel(cfg).eval().requires_grad_(False).use_channels_last()
x = torch.randn(2, 4, latent, latent); t = torch.tensor([999.0, 500.0])
ctx = torch.randn(2, 77, cfg.context_dim)
import inspect
if "cond" in inspect.signature(UNetModel.forward).parameters:  # the tree's own API
    from model.conditioning import Conditioning
    cond = Conditioning(ctx)
else:
    cond = ctx
with torch.inference_mode():
    unet(x, t, cond)
    out["unet"] = best(lambda: unet(x, t, cond), 1 if quick else 2)

pipe = load_pipeline("demo", device="cpu")
side, steps = (64, 4) if quick else (128, 20)
kw = dict(width=side, height=side, steps=steps, guidance_scale=7.5, sampler="euler_a", seed=1)
pipe.generate("warm", **{**kw, "steps": 1})
out["generate"] = best(lambda: pipe.generate("a lighthouse", **kw), 1 if quick else 2)

samplers = ["ddim", "euler_a", "dpmpp_2m", "heun"]
jobs = [dict(prompt=f"job {i}", width=side if i % 2 else 64, height=side, steps=steps,
             sampler=samplers[i % 4], seed=i, guidance_scale=7.5 if i % 3 else 1.0)
        for i in range(4 if quick else 12)]
def make(i, fields):
    if hasattr(et.GenerationRequest, "of"):
        return et.GenerationRequest.of(f"j{i}", **fields)
    return et.GenerationRequest(id=f"j{i}", **fields)
def serve():
    engine = Engine(pipe, max_batch=16)
    handles = [engine.submit(make(i, j)) for i, j in enumerate(jobs)]
    if hasattr(engine, "run_until_idle"):
        engine.run_until_idle()
    else:
        while engine.step():
            pass
        engine.flush_callbacks()
    assert all(len(h.images) >= 1 for h in handles), [h.error for h in handles]
out["engine"] = best(serve, 1)
print("RESULT " + json.dumps(out))
"""


def export(rev: str, dest: Path) -> None:
    """The tree at `rev` (tracked files only) into dest."""
    archive = subprocess.run(
        ["git", "-C", str(common.ROOT), "archive", rev], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def measure(tree: Path, threads: int, quick: bool, latent: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), "1" if quick else "0", str(latent)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{tree}: child failed\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default=BASELINE_REV, help="the earlier commit to compare with")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latent", type=int, default=32, help="SD 1.5 UNet latent side")
    p.add_argument("--quick", action="store_true", help="tiny UNet, tiny jobs, 1 round")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.latent = 1, 8
    print(f"load average at start: {load_average()}")
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp)
        export(args.rev, old)
        rounds: list[tuple[dict[str, float], dict[str, float]]] = []
        for r in range(args.rounds):
            if r % 2 == 0:  # alternate who goes first
                new_t = measure(common.ROOT, args.threads, args.quick, args.latent)
                old_t = measure(old, args.threads, args.quick, args.latent)
            else:
                old_t = measure(old, args.threads, args.quick, args.latent)
                new_t = measure(common.ROOT, args.threads, args.quick, args.latent)
            rounds.append((new_t, old_t))
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {new_t[k]:.3f}s vs {old_t[k]:.3f}s" for k in new_t))  # fmt: skip
    rows, record = [], {}
    for key in rounds[0][0]:
        new = median([n[key] for n, _ in rounds])
        old_m = median([o[key] for _, o in rounds])
        ratio = median([n[key] / o[key] for n, o in rounds])
        rows.append([key, f"{new:.3f}", f"{old_m:.3f}", f"{ratio:.3f}"])
        record[key] = {"this": new, "previous": old_m, "ratio": ratio}
    print(f"\nthis tree vs {args.rev}, {args.rounds} rounds, medians (ratio: of per-round ratios)")
    print(table(["measure", "this s", f"{args.rev} s", "ratio"], rows))
    print(f"load average at end: {load_average()}")
    emit_json("vs_previous", {"quick": args.quick, "rev": args.rev, "results": record})


if __name__ == "__main__":
    main()
