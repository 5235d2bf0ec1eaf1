"""Batched unmerged LoRA: one UNet call whose rows use four different adapters, against the
same call without adapters (random weights, SD 1.5 shape).

16 rows, 4 rank-32 adapters (each on 4 rows) on the layers a kohya LoRA trains by default
(every Linear / Conv2d of the spatial transformers: attention, feed-forward, proj_in/out);
`--conv` adds the ResBlocks' and samplers' convolutions (LoCon). The layers are made
adaptable as model.lora_library does, so the "plain" call pays the installed layers' check
too. Runs interleaved under torch.inference_mode after a warm-up; printed: median seconds of
each and their ratio (goal: close to 1).

    .venv/bin/python bench/lora.py                  # SD 1.5 shape, latent 32, 16 rows, CPU
    .venv/bin/python bench/lora.py --latent 64 --device cuda --dtype fp16
    .venv/bin/python bench/lora.py --quick          # tiny UNet, seconds (smoke test)
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import common  # noqa: F401  (puts the repo root on sys.path)
import torch
from common import emit_json, interleaved, load_average, median, set_threads, table
from torch import nn

from model.conditioning import Conditioning
from model.lora_files import LoraFile, LoraWeight
from model.lora_layers import LoraSlot, applied, install
from model.unet import UNetModel
from model.unet_config import UNetConfig

TINY = UNetConfig(
    model_channels=32, channel_mult=(1, 2), attention_levels=(0,), num_res_blocks=1, context_dim=32
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def targets(unet: nn.Module, conv: bool) -> list[str]:
    """kohya's default LoRA targets (the transformers), plus every conv with `conv`."""
    out = []
    for name, m in unet.named_modules():
        if not isinstance(m, nn.Linear | nn.Conv2d):
            continue
        in_transformer = ".transformer_blocks." in name or name.endswith(("proj_in", "proj_out"))
        if in_transformer or (conv and isinstance(m, nn.Conv2d)):
            out.append(name)
    return out


def random_adapter(
    unet: nn.Module,
    names: list[str],
    rank: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> LoraFile:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name in names:
        m = unet.get_submodule(name)
        if isinstance(m, nn.Linear):
            down, up = (
                torch.randn(rank, m.in_features, generator=gen),
                torch.randn(m.out_features, rank, generator=gen),
            )
        else:
            assert isinstance(m, nn.Conv2d)
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=gen)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=gen)
        weights[name] = LoraWeight(
            (down * 0.01).to(device, dtype), (up * 0.01).to(device, dtype), 1.0
        )
    return LoraFile(f"bench-{seed}", {"unet": weights})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--conv", action="store_true", help="also adapt the convolutions (LoCon)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny UNet, latent 8, 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.latent, args.repeats = 8, 2
    threads = set_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"load average at start: {load_average()}")
    cfg = TINY if args.quick else UNetConfig()  # UNetConfig's defaults are SD 1.5
    torch.manual_seed(0)
    unet = UNetModel(cfg).eval().requires_grad_(False).to(device, dtype)
    if device.type == "cpu":
        unet.use_channels_last()  # as the CPU pipeline runs it
    names = targets(unet, args.conv)
    slot = LoraSlot("unet")
    install(unet, names, slot)
    adapters = [
        random_adapter(unet, names, args.rank, s, device, dtype) for s in range(args.adapters)
    ]
    per_row = tuple(((adapters[i % len(adapters)], 0.8),) for i in range(args.rows))
    n_params = sum(t.numel() for t in unet.parameters())
    lora_params = sum(w.down.numel() + w.up.numel() for w in adapters[0].weights("unet").values())
    print(
        f"UNet {cfg.channel_mult} x{cfg.model_channels}: {n_params / 1e6:.1f}M parameters; "
        f"{len(names)} adapted layers, {lora_params / 1e6:.2f}M parameters per adapter; "
        f"{args.rows} rows over {args.adapters} rank-{args.rank} adapters, latent {args.latent}, "
        f"{args.dtype} on {device}"
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.rows, 4, args.latent, args.latent, generator=gen).to(device, dtype)
    t = torch.linspace(999.0, 1.0, args.rows, device=device)
    cond = Conditioning(
        torch.randn(args.rows, 77, cfg.context_dim, generator=gen).to(device, dtype)
    )
    lora_cond = replace(cond, loras=per_row)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> torch.Tensor:
        with torch.inference_mode():
            out = unet(x, t, cond)
        sync()
        return out

    def lora() -> torch.Tensor:
        with torch.inference_mode(), applied(slot, lora_cond.loras, device):
            out = unet(x, t, lora_cond)
        sync()
        return out

    delta = (lora() - plain()).abs().max().item()
    times = interleaved({"plain": plain, "lora": lora}, args.repeats, warmup=1)
    m_plain, m_lora = median(times["plain"]), median(times["lora"])
    ratio = m_lora / m_plain
    print(table(["call", "median s"], [["no adapters", m_plain], ["4 adapters", m_lora]]))
    print(f"overhead ratio (with / without adapters): {ratio:.3f}; max |delta| {delta:.3g}")
    emit_json(
        "lora",
        {
            "quick": args.quick,
            "threads": threads,
            "device": str(device),
            "dtype": args.dtype,
            "latent": args.latent,
            "rows": args.rows,
            "adapters": args.adapters,
            "rank": args.rank,
            "conv": args.conv,
            "adapted_layers": len(names),
            "plain_s": m_plain,
            "lora_s": m_lora,
            "ratio": ratio,
            "plain_all_s": times["plain"],
            "lora_all_s": times["lora"],
        },
    )


if __name__ == "__main__":
    main()
