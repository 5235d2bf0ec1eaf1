"""Engine images/s at saturation vs diffusers' pipeline at its best batch size, on one CUDA GPU.

SD 1.5 shapes with random weights (UNet ~860M, SD VAE, CLIP ViT-L text tower), fp16,
512x512, 25 steps (euler_a), CFG 7.5, images decoded to uint8 by both. Ours shares diffusers'
weight tensors (mapped in memory with model.unet_convert / model.vae_convert), SDPA attention
in both.

- engine: for each max_batch (UNet rows; CFG takes two per image) submit a mixed workload
  at once (different prompts and seeds; steps 20/25/30 and samplers euler_a / dpmpp_2m /
  ddim in turn; about two waves), time first submit -> last image; then the same at the
  largest max_batch with the UNet compiled (model.compiled: buckets, CUDA graphs through
  "reduce-overhead", compiled before timing). UNet it/s = UNet rows evaluated per second.
- diffusers: StableDiffusionPipeline with 1/2/4/8 images per call (num_images_per_prompt),
  25 steps; the best of them is the baseline.
- FLOPs are counted, not guessed: torch.utils.flop_counter on one UNet forward of one row
  at the latent size, one VAE decode and one text encoding; an image = steps x 2 UNet rows
  (CFG) + decode + 2 encodings. Share of peak = achieved FLOP/s / the card's dense fp16 peak
  (table by device name, or --peak-tflops).

Every configuration is caught on failure (OOM, compile error) and reported, and the run
stops starting new configurations after --budget-s seconds, so one try on a rented GPU
always prints a result.

    .venv/bin/python bench/gpu.py                          # on a CUDA machine (with --compile)
    .venv/bin/python bench/gpu.py --device cpu --tiny --quick   # CPU smoke test of the code path
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from typing import Any

import common  # noqa: F401  (puts the repo root on sys.path)
import torch
from common import DEMO_UNET, SD15_UNET, emit_json, load_average, set_threads, table

MIXED = (("euler_a", 25), ("dpmpp_2m", 20), ("ddim", 30))  # the engine's mixed workload
PEAK_FP16_TFLOPS = {  # dense fp16 tensor-core peak; first matching substring wins
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "A10": 125.0,
}

SD15_VAE: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
TINY_VAE: dict[str, Any] = {
    **SD15_VAE,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
}


def peak_tflops(device: torch.device, flag: float | None) -> tuple[float | None, str]:
    if flag is not None:
        return flag, "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a (not CUDA)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FP16_TFLOPS.items():
        if key in name:
            return value, f"table[{key}]"
    return None, f"unknown card {name!r}: pass --peak-tflops"


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(diffusers pipeline, our Pipeline) sharing one set of random weights on `device`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel

    from model.pipeline import Pipeline
    from model.samplers import SD15_SCHEDULER_CONFIG, NoiseSchedule
    from model.text import TextEncoder, bundled_tokenizer, clip_text_config
    from model.unet import UNetModel
    from model.unet_config_diffusers import unet_config_from_diffusers
    from model.unet_convert import unet_state_dict_from_diffusers
    from model.vae import AutoencoderKL as OurVAE
    from model.vae_convert import vae_config_from_diffusers, vae_state_dict_from_diffusers
    from model.weights import build_module

    torch.manual_seed(0)
    ucfg, vcfg = (DEMO_UNET, TINY_VAE) if tiny else (SD15_UNET, SD15_VAE)
    with torch.device(device):  # random init on the GPU: seconds, not minutes
        unet = UNet2DConditionModel(**ucfg)
        vae = AutoencoderKL(**vcfg)
        text = CLIPTextModel(
            clip_text_config(hidden=ucfg["cross_attention_dim"], layers=2 if tiny else 12)
        )
    for m in (unet, vae, text):
        m.to(dtype).eval().requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    from diffusers import EulerAncestralDiscreteScheduler

    tokenizer = bundled_tokenizer()
    ref = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)

    our_ucfg = unet_config_from_diffusers(dict(unet.config), source="bench")
    our_unet = build_module(
        lambda: UNetModel(our_ucfg),
        unet_state_dict_from_diffusers(unet.state_dict(), our_ucfg, source="bench"),
        what="UNet",
        source="bench",
        device=device,
        dtype=dtype,
    )
    our_vcfg = vae_config_from_diffusers(dict(vae.config), source="bench")
    our_vae = build_module(
        lambda: OurVAE(our_vcfg),
        vae_state_dict_from_diffusers(vae.state_dict()),
        what="VAE",
        source="bench",
        device=device,
        dtype=dtype,
    )
    ours = Pipeline(
        unet=our_unet,
        vae=our_vae,
        text=TextEncoder(text, tokenizer),
        schedule=NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG),
        name="sd15-random",
    )
    return ref, ours


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_tflop(pipe: Any, size: int) -> dict[str, float]:
    """TFLOP of one UNet row, one VAE decode and one text encoding at ``size`` (counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    c, h, w = pipe.latent_shape(size, size)[1:]
    x = torch.zeros(1, c, h, w, device=pipe.device, dtype=pipe.dtype)
    t = torch.full((1,), 500.0, device=pipe.device)
    out: dict[str, float] = {}
    with torch.inference_mode():
        emb = pipe.encode_prompts(["a photo"])
        for name, fn in (
            ("unet_row", lambda: pipe.unet(x, t, emb)),
            ("vae_decode", lambda: pipe.vae.decode(x.to(pipe.vae_dtype))),
            ("text", lambda: pipe.encode_prompts(["a photo"])),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[name] = counter.get_total_flops() / 1e12
    return out


def mixed_jobs(n: int, size: int, steps_scale: float) -> list[Any]:
    from service.engine_types import GenerationRequest

    jobs = []
    for i in range(n):
        sampler, steps = MIXED[i % len(MIXED)]
        job = GenerationRequest.of(
            f"j{i}", prompt=f"a photo of a lighthouse, variant {i}", width=size, height=size,
            steps=max(1, round(steps * steps_scale)), guidance_scale=7.5, sampler=sampler, seed=i,
        )  # fmt: skip
        jobs.append(job)
    return jobs


def engine_run(
    pipe: Any, max_batch: int, jobs: list[Any], device: torch.device
) -> dict[str, float]:
    """images/s and UNet rows/s of the engine serving ``jobs`` submitted at once."""
    from service.engine import Engine

    engine = Engine(pipe, max_batch=max_batch)
    try:
        sync(device)
        t0 = time.perf_counter()
        handles = [engine.submit(job) for job in jobs]
        outs = engine.run_until_idle()
        sync(device)
        elapsed = time.perf_counter() - t0
    finally:
        engine.close_admission()
    failed = [h for h in handles if h.error or len(h.images) != 1]
    if failed:
        raise RuntimeError(f"{len(failed)} engine jobs failed: {failed[0].error}")
    rows = sum(r for o in outs for r, _ in o.calls)
    return {"images_per_s": len(jobs) / elapsed, "unet_rows_per_s": rows / elapsed}


def diffusers_run(
    ref: Any, per_call: int, calls: int, size: int, steps: int, device: torch.device
) -> dict[str, float]:
    sync(device)
    t0 = time.perf_counter()
    for c in range(calls):
        gens = [torch.Generator("cpu").manual_seed(c * per_call + i) for i in range(per_call)]
        with torch.inference_mode():
            ref(
                "a photo of a lighthouse",
                num_inference_steps=steps,
                guidance_scale=7.5,
                width=size,
                height=size,
                num_images_per_prompt=per_call,
                generator=gens,
                output_type="np",
            )
    sync(device)
    elapsed = time.perf_counter() - t0
    images = per_call * calls
    return {"images_per_s": images / elapsed, "unet_rows_per_s": images * 2 * steps / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model, 64x64 (CPU code-path check)")
    p.add_argument("--quick", action="store_true", help="fewest configs and steps")
    p.add_argument("--size", type=int, default=None, help="image side (512; tiny 64)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--engine-rows", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--diffusers-batch", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--images", type=int, default=None, help="images per config (default 2 waves)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the compiled engine run")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no config after this")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (cpu device only)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "bench/gpu.py needs a CUDA GPU (none found). For a CPU check of the code path: --device cpu --tiny --quick"
        )
    if device.type != "cuda" and not args.tiny:
        sys.exit("bench/gpu.py measures SD 1.5 at 512x512 on CUDA only; on CPU use --tiny")
    if device.type == "cpu":
        set_threads(args.threads)
    size = args.size or (64 if args.tiny else 512)
    steps = 3 if args.quick and args.tiny else args.steps
    rows_sweep = [4, 8] if args.quick and args.tiny else args.engine_rows
    batch_sweep = [1, 2] if args.quick and args.tiny else args.diffusers_batch
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, peak_src = peak_tflops(device, args.peak_tflops)
    print(
        f"device {name}, dtype {dtype}, {size}x{size}, {steps} steps, CFG 7.5, torch {torch.__version__}"
    )
    print(f"peak fp16 dense: {peak} TFLOPS ({peak_src}); load average {load_average()}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    ref, ours = build(args.tiny, device, dtype)
    print(f"built models in {time.perf_counter() - start:.0f}s")
    if args.channels_last:
        for m in (ref.unet, ref.vae, ours.unet, ours.vae):
            m.to(memory_format=torch.channels_last)
    flop = count_tflop(ours, size)
    # One image: steps x 2 UNet rows (CFG), one decode, two text encodings (prompt, negative).
    image_tflop = 2 * steps * flop["unet_row"] + flop["vae_decode"] + 2 * flop["text"]
    print(f"counted: UNet row {flop['unet_row']:.3f} TFLOP, VAE decode {flop['vae_decode']:.3f}, "
          f"text {flop['text']:.4f}; one {steps}-step CFG image {image_tflop:.2f} TFLOP")  # fmt: skip
    rows_out: list[list[Any]] = []
    results: list[dict[str, Any]] = []

    def record(kind: str, setting: int, fn: Any, row_tflop: float) -> None:
        if time.perf_counter() - start > args.budget_s:
            results.append({"impl": kind, "setting": setting, "skipped": "time budget"})
            rows_out.append([kind, setting, "skipped", "", "", ""])
            return
        try:
            fn(1)  # warm-up (cudnn autotune, allocator): one short pass
            got = fn(0)
            tflops = got["unet_rows_per_s"] * row_tflop
            share = tflops / peak if peak else None
            results.append({"impl": kind, "setting": setting, **got, "unet_tflops": tflops,
                            "peak_share": share})  # fmt: skip
            rows_out.append([kind, setting, got["images_per_s"], got["unet_rows_per_s"], tflops,
                             "-" if share is None else f"{100 * share:.1f}%"])  # fmt: skip
        except Exception as exc:  # keep going: one failing config must not cost the run
            traceback.print_exc()
            results.append(
                {"impl": kind, "setting": setting, "error": f"{type(exc).__name__}: {exc}"}
            )
            rows_out.append([kind, setting, f"failed: {type(exc).__name__}", "", "", ""])
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  {rows_out[-1]}  ({time.perf_counter() - start:.0f}s)", flush=True)

    scale = 3 / 25 if args.quick and args.tiny else steps / 25
    for rows in rows_sweep:
        images = args.images or max(3, rows)  # rows/2 images per call: about two waves

        def run_engine(warm: int, rows: int = rows, images: int = images) -> dict[str, float]:
            jobs = mixed_jobs(
                max(1, rows // 2) if warm else images, size, 2 / 25 if warm else scale
            )
            return engine_run(ours, rows, jobs, device)

        record("engine mixed, eager", rows, run_engine, flop["unet_row"])
    if args.compile:
        from model.compiled import default_buckets

        rows = max(rows_sweep)
        mode = "reduce-overhead" if device.type == "cuda" else None
        try:
            t = time.perf_counter()
            ours.compile_unet(default_buckets(rows), mode)
            ours.warm_compiled(size, size)
            print(f"compiled the UNet for {default_buckets(rows)} rows in "
                  f"{time.perf_counter() - t:.0f}s")  # fmt: skip

            def run_compiled(warm: int, rows: int = rows) -> dict[str, float]:
                n = max(1, rows // 2) if warm else (args.images or max(3, rows))
                return engine_run(ours, rows, mixed_jobs(n, size, 2 / 25 if warm else scale),
                                  device)  # fmt: skip

            record("engine mixed, compiled", rows, run_compiled, flop["unet_row"])
        except Exception as exc:
            traceback.print_exc()
            rows_out.append(["engine mixed, compiled", rows, f"failed: {type(exc).__name__}",
                             "", "", ""])  # fmt: skip
    for per_call in batch_sweep:
        calls = max(1, (args.images or 2 * per_call) // per_call) if not args.quick else 1

        def run_ref(warm: int, per_call: int = per_call, calls: int = calls) -> dict[str, float]:
            if warm:
                return diffusers_run(ref, per_call, 1, size, 2, device)
            return diffusers_run(ref, per_call, calls, size, steps, device)

        record("diffusers images/call", per_call, run_ref, flop["unet_row"])

    print(table(["impl", "setting", "images/s", "UNet it/s (rows)", "UNet TFLOPS", "of peak"],
                rows_out))  # fmt: skip

    def best(kind: str) -> float | None:
        return max((r["images_per_s"] for r in results if r["impl"] == kind
                    and "images_per_s" in r), default=None)  # fmt: skip

    eng, comp, dif = (
        best("engine mixed, eager"),
        best("engine mixed, compiled"),
        best("diffusers images/call"),
    )
    ratio = eng / dif if eng and dif else None
    print(f"best engine (eager) {eng} images/s, compiled {comp}, best diffusers {dif} "
          f"images/s; engine/diffusers {ratio}")  # fmt: skip
    emit_json(
        "gpu",
        {
            "device": name,
            "dtype": str(dtype),
            "size": size,
            "steps": steps,
            "tiny": args.tiny,
            "quick": args.quick,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "peak_tflops": peak,
            "counted_tflop": flop,
            "image_tflop": image_tflop,
            "results": results,
            "best_engine_images_per_s": eng,
            "best_engine_compiled_images_per_s": comp,
            "best_diffusers_images_per_s": dif,
            "engine_over_diffusers": ratio,
            "wall_s": time.perf_counter() - start,
        },
    )


if __name__ == "__main__":
    main()
