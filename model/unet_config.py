"""The UNet's architecture: :class:`UNetConfig` (frozen; defaults are Stable Diffusion 1.x).

The block order it describes (:meth:`UNetConfig.input_layout`, :meth:`UNetConfig.output_layout`)
is shared by the model (:mod:`model.unet`) and the key converter (:mod:`model.unet_convert`).
"""

from __future__ import annotations

from dataclasses import dataclass

LABEL_KINDS = ("classes", "timestep", "projection", "text_time")


def _per_level(value: int | tuple[int, ...], level: int) -> int:
    return value if isinstance(value, int) else value[level]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of one UNet; defaults are Stable Diffusion 1.x.

    Per-level fields take one int (every level) or a tuple with one entry per level of
    `channel_mult`; the up path mirrors the down path unless its own fields say otherwise.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int | tuple[int, ...] = 2  # per level (down); the up path has one more
    attention_levels: tuple[int, ...] = (0, 1, 2)  # down levels (0 = full size) with attention
    attention_levels_up: tuple[int, ...] | None = None  # up levels with attention (None: same)
    num_heads: int | tuple[int, ...] | None = 8  # heads per level (SD 1.x: 8); mid = last ...
    head_dim: int | None = None  # ... or fixed channels per head (SD 2.x, SDXL: 64)
    transformer_depth: int | tuple[int, ...] = 1  # transformer blocks per level (SDXL 1, 2, 10)
    transformer_depth_up: int | tuple[int, ...] | None = None  # the up path's (None: same)
    transformer_depth_middle: int | None = None  # None: the last level's
    context_dim: int = 768
    use_linear_projection: bool = False  # SD 2.x projects in/out of transformers with Linear
    # Levels (down and up) and the middle block whose transformers' first attention attends to
    # the text instead of the image (the original's disable_self_attn; the x4 upscaler's).
    cross_only_levels: tuple[int, ...] = ()
    cross_only_middle: bool = False
    upcast_attention: bool = False  # compute attention in float32 under fp16 (SD 2.1-v)
    norm_groups: int = 32
    # What `label_emb` adds to the time embedding: None; "classes" (a table of num_classes
    # rows indexed by cond.class_labels); an MLP over "timestep" (the sinusoid of
    # cond.class_labels), "projection" (cond.class_labels as a vector) or "text_time" (SDXL:
    # cond.pooled followed by the sinusoids of cond.time_ids).
    label: str | None = None
    num_classes: int | None = None  # "classes"
    adm_in_channels: int | None = None  # the MLP's input width ("projection", "text_time")
    addition_time_embed_dim: int = 256  # "text_time": sinusoid width per time id

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        for name in ("num_res_blocks", "num_heads", "transformer_depth", "transformer_depth_up"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != levels:
                raise ValueError(f"UNetConfig.{name} has {len(value)} entries for {levels} levels")
        if self.num_heads is None and self.head_dim is None:
            raise ValueError("UNetConfig needs num_heads or head_dim")
        if self.label is not None and self.label not in LABEL_KINDS:
            raise ValueError(f"UNetConfig.label must be one of {LABEL_KINDS}, got {self.label!r}")
        if self.label == "classes" and not self.num_classes:
            raise ValueError("UNetConfig.label 'classes' needs num_classes")
        if self.label in ("projection", "text_time") and not self.adm_in_channels:
            raise ValueError(f"UNetConfig.label {self.label!r} needs adm_in_channels")

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def res_blocks(self, level: int) -> int:
        """ResBlocks of a down level (its up level has one more)."""
        return _per_level(self.num_res_blocks, level)

    def has_attention(self, level: int, up: bool = False) -> bool:
        if up and self.attention_levels_up is not None:
            return level in self.attention_levels_up
        return level in self.attention_levels

    def depth(self, level: int, up: bool = False) -> int:
        """Transformer blocks per spatial transformer at a level; level -1 = the middle block."""
        if level < 0 and self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        depths = self.transformer_depth
        if up and self.transformer_depth_up is not None:
            depths = self.transformer_depth_up
        return _per_level(depths, level)

    def heads_for(self, level: int) -> tuple[int, int]:
        """(number of heads, channels per head) at a level; level -1 = the middle block."""
        channels = self.model_channels * self.channel_mult[level]
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        heads = _per_level(self.num_heads, level)  # type: ignore[arg-type]
        return heads, channels // heads

    def input_layout(self) -> list[tuple[int, int | None]]:
        """(level, ResBlock index) of every input block after conv_in; None = a downsample."""
        out: list[tuple[int, int | None]] = []
        for level in range(self.levels):
            out += [(level, j) for j in range(self.res_blocks(level))]
            if level != self.levels - 1:
                out.append((level, None))
        return out

    def output_layout(self) -> list[tuple[int, int]]:
        """(level, ResBlock index) of every output block; the last of a level > 0 upsamples."""
        return [
            (level, j)
            for level in reversed(range(self.levels))
            for j in range(self.res_blocks(level) + 1)
        ]

    @property
    def label_input_dim(self) -> int | None:
        """Width of the vector label_emb's MLP takes (None: no MLP)."""
        if self.label == "timestep":
            return self.model_channels
        return self.adm_in_channels if self.label in ("projection", "text_time") else None
