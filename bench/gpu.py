"""Engine images/s at saturation vs diffusers' pipeline at its best batch size, on one CUDA GPU.

SD 1.5 shapes with random weights (UNet ~860M, SD VAE, CLIP ViT-L text tower), fp16,
512x512, 25 steps (euler_a), CFG 7.5, images decoded to uint8 by both. Ours shares diffusers'
weight tensors (mapped in memory with model.unet_convert / model.vae_convert), SDPA attention
in both.

- engine: for each max_batch (UNet rows; CFG takes two per image) submit enough identical
  jobs at once to fill two waves, time first submit -> last image.
- diffusers: StableDiffusionPipeline with 1/2/4/8 images per call (num_images_per_prompt).
- FLOP share: images/s x 43 TFLOP (one 25-step CFG image with the VAE; one UNet forward at
  64x64 ~ 0.80 TFLOP) / the card's dense fp16 peak (table by device name, or --peak-tflops).

Every configuration is caught on failure (OOM, compile error) and reported, and the run
stops starting new configurations after --budget-s seconds, so one try on a rented GPU
always prints a result. CUDA graphs for fixed batch buckets are future work (the engine's
batch size varies per step; each bucket would need its own captured graph).

    .venv/bin/python bench/gpu.py                          # on a CUDA machine
    .venv/bin/python bench/gpu.py --channels-last --compile
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

IMAGE_TFLOP = 43.0  # one 25-step CFG image at 512x512, VAE decode included
UNET_TFLOP_64 = 0.80  # one UNet forward of one row at a 64x64 latent
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
    from model.unet_convert import unet_config_from_diffusers, unet_state_dict_from_diffusers
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


def engine_images_per_s(
    pipe: Any, max_batch: int, n_jobs: int, size: int, steps: int, device: torch.device
) -> float:
    from service.engine import Engine
    from service.engine_types import GenerationRequest

    engine = Engine(pipe, max_batch=max_batch)
    try:
        sync(device)
        t0 = time.perf_counter()
        handles = [
            engine.submit(
                GenerationRequest.of(
                    f"j{i}",
                    prompt=f"a photo of a lighthouse, variant {i}",
                    width=size,
                    height=size,
                    steps=steps,
                    guidance_scale=7.5,
                    sampler="euler_a",
                    seed=i,
                )
            )
            for i in range(n_jobs)
        ]
        engine.run_until_idle()
        sync(device)
        elapsed = time.perf_counter() - t0
    finally:
        engine.close_admission()
    failed = [h for h in handles if h.error or len(h.images) != 1]
    if failed:
        raise RuntimeError(f"{len(failed)} engine jobs failed: {failed[0].error}")
    return n_jobs / elapsed


def diffusers_images_per_s(
    ref: Any, per_call: int, calls: int, size: int, steps: int, device: torch.device
) -> float:
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
    return per_call * calls / (time.perf_counter() - t0)


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
    p.add_argument("--compile", action="store_true", help="torch.compile both UNets")
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
    if args.compile:
        ours.unet = torch.compile(ours.unet)
        ref.unet = torch.compile(ref.unet)

    # Image FLOPs scale with steps and pixels; the 43 TFLOP figure is for 25 steps at 512x512.
    image_tflop = IMAGE_TFLOP * (steps / 25) * (size / 512) ** 2
    rows_out: list[list[Any]] = []
    results: list[dict[str, Any]] = []

    def record(kind: str, setting: int, fn: Any) -> None:
        if time.perf_counter() - start > args.budget_s:
            results.append({"impl": kind, "setting": setting, "skipped": "time budget"})
            rows_out.append([kind, setting, "skipped", "", ""])
            return
        try:
            fn(1)  # warm-up (cudnn autotune, compile): one short pass
            ips = fn(0)
            tflops = ips * image_tflop
            share = tflops / peak if peak else None
            results.append(
                {
                    "impl": kind,
                    "setting": setting,
                    "images_per_s": ips,
                    "tflops": tflops,
                    "peak_share": share,
                }
            )
            rows_out.append(
                [kind, setting, ips, tflops, "-" if share is None else f"{100 * share:.1f}%"]
            )
        except Exception as exc:  # keep going: one failing config must not cost the run
            traceback.print_exc()
            results.append(
                {"impl": kind, "setting": setting, "error": f"{type(exc).__name__}: {exc}"}
            )
            rows_out.append([kind, setting, f"failed: {type(exc).__name__}", "", ""])
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  {rows_out[-1]}  ({time.perf_counter() - start:.0f}s)", flush=True)

    for rows in rows_sweep:
        images = args.images or max(2, rows)  # rows/2 images per call: two full waves

        def run_engine(warm: int, rows: int = rows, images: int = images) -> float:
            n = max(1, rows // 2) if warm else images
            return engine_images_per_s(ours, rows, n, size, 2 if warm else steps, device)

        record("engine max_batch(rows)", rows, run_engine)
    for per_call in batch_sweep:
        calls = max(1, (args.images or 2 * per_call) // per_call) if not args.quick else 1

        def run_ref(warm: int, per_call: int = per_call, calls: int = calls) -> float:
            if warm:
                return diffusers_images_per_s(ref, per_call, 1, size, 2, device)
            return diffusers_images_per_s(ref, per_call, calls, size, steps, device)

        record("diffusers images/call", per_call, run_ref)

    print(table(["impl", "setting", "images/s", "TFLOPS", "of peak"], rows_out))
    best = {
        kind: max(
            (r["images_per_s"] for r in results if r["impl"] == kind and "images_per_s" in r),
            default=None,
        )
        for kind in ("engine max_batch(rows)", "diffusers images/call")
    }
    eng, dif = best["engine max_batch(rows)"], best["diffusers images/call"]
    ratio = eng / dif if eng and dif else None
    print(f"best engine {eng} images/s, best diffusers {dif} images/s, ratio {ratio}")
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
            "image_tflop": image_tflop,
            "unet_tflop_64": UNET_TFLOP_64,
            "results": results,
            "best_engine_images_per_s": eng,
            "best_diffusers_images_per_s": dif,
            "engine_over_diffusers": ratio,
            "wall_s": time.perf_counter() - start,
        },
    )


if __name__ == "__main__":
    main()
