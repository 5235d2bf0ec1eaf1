"""openaimodel's UNetModel without context (the CompVis `latent-diffusion` repo's single-file
layout below `model.diffusion_model.`) -> our UNet2DModel (diffusers' layout).

Original blocks: `input_blocks.0.0` conv in; per level `input_blocks.N.0` ResBlock
(`in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`, `skip_connection`) and `.1` AttentionBlock
(`norm`, fused `qkv` and `proj_out` as 1x1 conv1d), `input_blocks.N.0.op` downsampling;
`middle_block.0-2`; `output_blocks.N.0` ResBlock, `.1` attention, `.1` or `.2` `.conv`
upsampling; `time_embed.0/2`; `out.0/2`. The architecture comes from the shapes (widths,
levels, res blocks and attention per level, scale-shift where `emb_layers` emit twice the
width, time width); what they cannot tell is openaimodel's or the LDM configs' fixed choice:
32 channels per head in the legacy fused order (QKVAttentionLegacy: per head its q, k, v
rows), 32 norm groups everywhere, cos-first sinusoids without shift, downsampling padding 1.
Where the file's UNet is not a UNet2DModel (per-level counts, attention after some res blocks
of a level only, an up path that does not mirror the down path, a width 32 does not divide),
the load fails naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from model.unet2d import UNet2DConfig
from model.unet_convert import _RESNET_RENAMES
from model.unet_convert import LDM_PREFIX as UNET_PREFIX
from model.weights import CheckpointError

HEAD_CHANNELS = 32  # num_head_channels of celebahq-ldm-vq-4.yaml and bsr_sr/config.yaml
NORM_GROUPS = 32  # openaimodel's normalization(): GroupNorm32(32, channels)
_ORIGINAL_RESNET = {orig: ours for ours, orig in _RESNET_RENAMES.items()}
_BLOCK = re.compile(
    r"((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+|time_embed\.\d+|out\.\d+)\.(.+)"
)


def split_legacy_qkv(fused: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """QKVAttentionLegacy's fused 1x1-conv rows (3C, ...), per head q, k, v -> three (C, ...)."""
    c = fused.shape[0] // 3
    rows = fused.reshape(heads, 3, c // heads, *fused.shape[1:])  # (heads, qkv, d, ...)
    q, k, v = (rows[:, i].reshape(c, *fused.shape[1:]) for i in range(3))
    return q, k, v


class _Plan:
    """Where each original block goes in UNet2DModel, plus the architecture the walk finds."""

    def __init__(self, sd: Mapping[str, Tensor], source: str, sample_size: int) -> None:
        self.sd, self.source, self.sample_size = sd, source, sample_size
        self.moves: dict[str, tuple[str, str]] = {  # original block -> (ours, kind)
            "input_blocks.0.0": ("conv_in", "plain"),
            "time_embed.0": ("time_embedding.linear_1", "plain"),
            "time_embed.2": ("time_embedding.linear_2", "plain"),
            "out.0": ("conv_norm_out", "plain"),
            "out.2": ("conv_out", "plain"),
        }

    def need(self, key: str) -> Tensor:
        if key not in self.sd:
            raise CheckpointError(
                f"{self.source}: UNet weights are missing key '{UNET_PREFIX}{key}'"
            )
        return self.sd[key]

    def block(self, orig: str, ours: str, kind: str) -> None:
        self.moves[orig] = (ours, kind)

    def config(self) -> UNet2DConfig:
        conv_in = self.need("input_blocks.0.0.weight")  # (C0, in, 3, 3)
        time_dim = int(self.need("time_embed.0.weight").shape[0])
        widths, attention, counts = self._down()
        layers = counts[0]
        if any(c != layers for c in counts):
            raise CheckpointError(
                f"{self.source}: UNet res blocks per level differ ({counts}); UNet2DModel needs one count"
            )
        mid_attention = self._middle()
        self._up(attention, layers)
        first = self.need("input_blocks.1.0.emb_layers.1.weight")
        scale_shift = int(first.shape[0]) == 2 * widths[0]
        return UNet2DConfig(
            in_channels=int(conv_in.shape[1]),
            out_channels=int(self.need("out.2.weight").shape[0]),
            block_out_channels=tuple(widths),
            attention_levels=tuple(attention),
            layers_per_block=layers,
            attention_head_dim=HEAD_CHANNELS,
            norm_num_groups=NORM_GROUPS,
            attn_norm_num_groups=NORM_GROUPS,
            scale_shift=scale_shift,
            flip_sin_to_cos=True,
            freq_shift=0.0,
            time_embedding_dim=time_dim,
            downsample_padding=1,
            mid_attention=mid_attention,
            sample_size=self.sample_size,
        )

    def _attention(self, orig: str, ours: str) -> bool:
        key = f"{orig}.qkv.weight"
        if key not in self.sd:
            return False
        width = int(self.sd[key].shape[0]) // 3
        if width % HEAD_CHANNELS:
            raise CheckpointError(
                f"{self.source}: '{UNET_PREFIX}{key}' is {width} channels wide, not a multiple of "
                f"the {HEAD_CHANNELS} channels per head the CompVis LDM configs use"
            )
        self.block(orig, ours, "attn")
        return True

    def _down(self) -> tuple[list[int], list[bool], list[int]]:
        widths: list[int] = []
        attention: list[bool] = []
        counts: list[int] = []
        level: list[bool] = []  # attention after each res block of the level being walked

        def close() -> None:
            if len(set(level)) > 1:
                raise CheckpointError(
                    f"{self.source}: UNet down level {len(widths)} has attention after some res "
                    "blocks only; UNet2DModel needs all or none"
                )
            widths.append(width)
            attention.append(level[0])
            counts.append(len(level))
            level.clear()

        indices = sorted(
            {int(m[1]) for k in self.sd if (m := re.match(r"input_blocks\.(\d+)\.", k))}
        )
        width = 0
        for i in indices[1:]:
            orig = f"input_blocks.{i}"
            if f"{orig}.0.op.weight" in self.sd:
                self.block(f"{orig}.0", f"down_blocks.{len(widths)}.downsamplers.0", "down")
                close()
                continue
            width = int(self.need(f"{orig}.0.in_layers.2.weight").shape[0])
            ours = f"down_blocks.{len(widths)}"
            self.block(f"{orig}.0", f"{ours}.resnets.{len(level)}", "res")
            level.append(self._attention(f"{orig}.1", f"{ours}.attentions.{len(level)}"))
        if not level:
            raise CheckpointError(f"{self.source}: the UNet's last level has no res blocks")
        close()
        return widths, attention, counts

    def _middle(self) -> bool:
        self.need("middle_block.0.in_layers.2.weight")
        self.block("middle_block.0", "mid_block.resnets.0", "res")
        attention = self._attention("middle_block.1", "mid_block.attentions.0")
        last = "middle_block.2" if attention else "middle_block.1"
        self.need(f"{last}.in_layers.2.weight")
        self.block(last, "mid_block.resnets.1", "res")
        return attention

    def _up(self, attention: list[bool], layers: int) -> None:
        n = len(attention)
        for u in range(n):
            for j in range(layers + 1):
                orig = f"output_blocks.{u * (layers + 1) + j}"
                self.need(f"{orig}.0.in_layers.2.weight")
                self.block(f"{orig}.0", f"up_blocks.{u}.resnets.{j}", "res")
                has = self._attention(f"{orig}.1", f"up_blocks.{u}.attentions.{j}")
                if has != attention[n - 1 - u]:
                    raise CheckpointError(
                        f"{self.source}: '{UNET_PREFIX}{orig}' {'has' if has else 'lacks'} "
                        "attention where its down level does not; UNet2DModel mirrors them"
                    )
                if j == layers and u != n - 1:
                    up = f"{orig}.{2 if has else 1}"
                    self.need(f"{up}.conv.weight")
                    self.block(up, f"up_blocks.{u}.upsamplers.0", "plain")

    def tensors(self) -> dict[str, Tensor]:
        """Every original tensor under our name; a key no block claims fails the load."""
        out: dict[str, Tensor] = {}
        for key, value in self.sd.items():
            m = _BLOCK.fullmatch(key)
            if m is None or m[1] not in self.moves:
                raise CheckpointError(
                    f"{self.source}: UNet weights have unexpected key '{UNET_PREFIX}{key}'"
                )
            ours, kind = self.moves[m[1]]
            out.update(self._rename(ours, kind, m[2], value, key))
        return out

    def _rename(
        self, ours: str, kind: str, rest: str, value: Tensor, key: str
    ) -> dict[str, Tensor]:
        module, _, param = rest.rpartition(".")
        if kind == "plain":
            return {f"{ours}.{rest}": value}
        if kind == "down" and module == "op":
            return {f"{ours}.conv.{param}": value}
        if kind == "res" and module in _ORIGINAL_RESNET:
            return {f"{ours}.{_ORIGINAL_RESNET[module]}.{param}": value}
        if kind == "attn" and module == "norm":
            return {f"{ours}.group_norm.{param}": value}
        if kind == "attn" and module == "proj_out":
            return {f"{ours}.to_out.0.{param}": value.flatten(1) if value.ndim > 1 else value}
        if kind == "attn" and module == "qkv":
            fused = value.flatten(1) if value.ndim > 1 else value  # (3C, C, 1) -> (3C, C)
            parts = split_legacy_qkv(fused, fused.shape[0] // 3 // HEAD_CHANNELS)
            return {f"{ours}.to_{n}.{param}": t for n, t in zip("qkv", parts, strict=True)}
        raise CheckpointError(
            f"{self.source}: UNet weights have unexpected key '{UNET_PREFIX}{key}'"
        )


def unet2d_from_original(
    sd: Mapping[str, Tensor], *, source: str, sample_size: int
) -> tuple[UNet2DConfig, dict[str, Tensor]]:
    """openaimodel UNet keys (prefix stripped) -> (UNet2DModel config, its state dict);
    `sample_size`, the latent side of the training images, is not in the weights."""
    plan = _Plan(sd, source, sample_size)
    config = plan.config()
    return config, plan.tensors()
