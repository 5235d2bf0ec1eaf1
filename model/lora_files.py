"""LoRA adapter files → low-rank weights keyed by the module they adapt in our networks.

Formats (safetensors only, detected from the keys):
- kohya-ss / sd-scripts: `lora_unet_<module>` and `lora_te_<module>` (SDXL: `lora_te1_` for
  CLIP ViT-L, `lora_te2_` for bigG) with `.lora_down.weight`,
  `.lora_up.weight` and an optional `.alpha`, the module path flattened with `_` (diffusers
  spelling, or the original LDM spelling `input_blocks_1_1_...`); LoCon adds conv adapters
  (a k x k `lora_down` convolution with the adapted layer's stride and padding, 1x1 `lora_up`).
  kohya's SDXL files use the original layout (`input_blocks_4_1_transformer_blocks_0_...`).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` and
  `text_encoder.<module>...` (SDXL's second: `text_encoder_2.`); alpha from an optional `<module>.alpha` key or the file's
  `lora_adapter_metadata` (`<part>.lora_alpha`, `<part>.alpha_pattern`), else the rank.

The update a layer adds is `multiplier * alpha / rank * up(down(x))`, as diffusers' unfused
`set_adapters` computes it. Module names are matched through the diffusers ⇄ original name
conversion the checkpoint loader uses (model.unet_convert), and the text encoder's modules are
`transformers.CLIPTextModel`'s own names. Any key that does not fit (an unknown module, a
wrong shape, an unsupported adapter type) is a LoraError naming the file and the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from model.unet_convert import diffusers_module_names

TEXT_MODEL = "text_model."  # CLIPTextModel's submodule in files (transformers < 5 kept it)

# Adapter kinds this module reads; any other LyCORIS tensor names an unsupported kind.
_UNSUPPORTED = {
    "hada_w1_a": "LyCORIS LoHa",
    "lokr_w1": "LyCORIS LoKr",
    "lora_mid": "LyCORIS Tucker (lora_mid)",
    "dora_scale": "DoRA",
    "diff": "full weight difference",
}
TEXT_PARTS = ("text", "text_2")  # the (first) text encoder; SDXL's second (bigG)
PARTS = ("unet", *TEXT_PARTS)
_KOHYA_PREFIX = {
    "lora_unet_": "unet",
    "lora_te_": "text",
    "lora_te1_": "text",
    "lora_te2_": "text_2",
}
_PEFT_PREFIX = {"unet.": "unet", "text_encoder.": "text", "text_encoder_2.": "text_2"}


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model; the message names the file and key."""


@dataclass(frozen=True)
class LoraWeight:
    """One adapted layer: x -> up(down(x)) * scale, scale = alpha / rank."""

    down: Tensor  # (r, in) for Linear, (r, in, kh, kw) for Conv2d
    up: Tensor  # (out, r) for Linear, (out, r, 1, 1) for Conv2d
    scale: float  # alpha / rank

    @property
    def nbytes(self) -> int:
        return (
            self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()
        )


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A loaded adapter: per part (PARTS), module name -> weight. Compared by identity."""

    key: str  # the file (and its version): one adapter file is one adapter
    parts: dict[str, dict[str, LoraWeight]] = field(default_factory=dict, repr=False)

    def weights(self, part: str) -> dict[str, LoraWeight]:
        return self.parts.get(part, {})

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for p in self.parts.values() for w in p.values())


@dataclass(frozen=True)
class Targets:
    """The layers of one network an adapter may address, and the names it may use for them."""

    modules: dict[str, nn.Linear | nn.Conv2d]  # our module name -> layer
    aliases: dict[str, str]  # dotted name (ours, diffusers') -> our module name

    @classmethod
    def of(cls, root: nn.Module, renames: Mapping[str, str] | None = None) -> Targets:
        """Every Linear / Conv2d below `root`, also under its diffusers name (`renames`)."""
        modules = {
            n: m for n, m in root.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and n
        }
        aliases = {n: n for n in modules}
        for ours, theirs in (renames or {}).items():
            if ours in modules:
                aliases[theirs] = ours
        return cls(modules, aliases)

    def flat(self) -> dict[str, str]:
        """kohya's spelling: the dotted path with `_` for `.`."""
        return {alias.replace(".", "_"): ours for alias, ours in self.aliases.items()}


def unet_targets(unet: nn.Module) -> Targets:
    """The UNet's layers, addressable by our (original LDM) and diffusers module names."""
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return Targets.of(unet, diffusers_module_names(unet.config, names))  # type: ignore[arg-type]


def text_targets(model: nn.Module) -> Targets:
    """A transformers CLIPTextModel's layers, by the names adapter files use: the model's own
    below `text_model.` (the CLIPTextModel layout files were written with), or without it."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return Targets.of(model, {n: f"{TEXT_MODEL}{n}" for n in names if not n.startswith(TEXT_MODEL)})


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRA files must be .safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{path}: not a readable safetensors file ({exc})") from None


def _alpha_from_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, dict[str, float]]:
    """PEFT metadata: {part prefix: {"": lora_alpha, module pattern: alpha, ...}}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise LoraError(f"{path}: metadata 'lora_adapter_metadata' is not JSON") from None
    out: dict[str, dict[str, float]] = {}
    for prefix in _PEFT_PREFIX:
        p = prefix.rstrip(".")
        alphas: dict[str, float] = {}
        if (a := meta.get(f"{p}.lora_alpha")) is not None:
            alphas[""] = float(a)
        for pattern, a in (meta.get(f"{p}.alpha_pattern") or {}).items():
            alphas[pattern] = float(a)
        out[prefix] = alphas
    return out


def _layer_weight(
    layer: nn.Linear | nn.Conv2d,
    down: Tensor,
    up: Tensor,
    alpha: float | None,
    *,
    where: str,
) -> LoraWeight:
    """Check shapes against the layer and put them in the layer's form."""
    rank = down.shape[0]
    if isinstance(layer, nn.Linear):
        down = down.flatten(1) if down.ndim == 4 and down.shape[2:] == (1, 1) else down
        up = up.flatten(1) if up.ndim == 4 and up.shape[2:] == (1, 1) else up
        want_down, want_up = (rank, layer.in_features), (layer.out_features, rank)
    else:
        if down.ndim == 2:
            down = down[:, :, None, None]
        if up.ndim == 2:
            up = up[:, :, None, None]
        k = tuple(down.shape[2:])
        if k not in ((1, 1), tuple(layer.kernel_size)):
            raise LoraError(f"{where}: down kernel {k} fits neither 1x1 nor {layer.kernel_size}")
        if k == (1, 1) and tuple(layer.kernel_size) != (1, 1):
            raise LoraError(f"{where}: a 1x1 down on a {layer.kernel_size} convolution")
        want_down = (rank, layer.in_channels, *k)
        want_up = (layer.out_channels, rank, 1, 1)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise LoraError(
            f"{where}: shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the "
            f"layer (expected {want_down} / {want_up})"
        )
    a = float(rank) if alpha is None else alpha
    return LoraWeight(down.contiguous(), up.contiguous(), a / rank)


def read_lora(
    path: str | Path,
    targets: Mapping[str, Targets],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoraFile:
    """Read and check a LoRA file against the networks it adapts (`targets`: part -> Targets)."""
    path = Path(path)
    tensors, metadata = _read(path)
    if not tensors:
        raise LoraError(f"{path}: no tensors")
    for key in tensors:
        for marker, kind in _UNSUPPORTED.items():
            if key.split(".")[-1].startswith(marker) or f".{marker}" in key:
                raise LoraError(f"{path}: key '{key}': {kind} adapters are not supported")
    first = next(iter(tensors))
    kohya = any(first.startswith(p) for p in _KOHYA_PREFIX)
    groups = _kohya_groups(tensors, path) if kohya else _peft_groups(tensors, metadata, path)
    parts: dict[str, dict[str, LoraWeight]] = {}
    for (part, name), (down_key, up_key, alpha) in groups.items():
        if part not in targets:
            raise LoraError(f"{path}: key '{down_key}': this model has no {part} to adapt")
        t = targets[part]
        ours = (t.flat() if kohya else t.aliases).get(name)
        if ours is None:
            raise LoraError(f"{path}: key '{down_key}': no layer '{name}' in this model's {part}")
        weight = _layer_weight(
            t.modules[ours],
            tensors[down_key],
            tensors[up_key],
            alpha,
            where=f"{path}: key '{down_key}'",
        )
        parts.setdefault(part, {})[ours] = LoraWeight(
            weight.down.to(device, dtype), weight.up.to(device, dtype), weight.scale
        )
    return LoraFile(str(path), parts)


Group = tuple[str, str, "float | None"]  # down key, up key, alpha


def _scalar(tensors: Mapping[str, Tensor], key: str, path: Path) -> float:
    value = tensors[key]
    if value.numel() != 1:
        raise LoraError(f"{path}: key '{key}': alpha must be a scalar, got {tuple(value.shape)}")
    return float(value.float().item())


def _kohya_groups(tensors: Mapping[str, Tensor], path: Path) -> dict[tuple[str, str], Group]:
    """kohya keys `lora_<part>_<flat module>.{lora_down.weight, lora_up.weight, alpha}`."""
    groups: dict[tuple[str, str], Group] = {}
    seen: set[str] = set()
    for key in tensors:
        module, _, suffix = key.partition(".")
        prefix = next((p for p in _KOHYA_PREFIX if module.startswith(p)), None)
        if prefix is None or suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise LoraError(f"{path}: key '{key}' is not a kohya LoRA key")
        if suffix != "lora_down.weight":
            continue
        up, alpha = f"{module}.lora_up.weight", f"{module}.alpha"
        if up not in tensors:
            raise LoraError(f"{path}: key '{key}' has no '{up}'")
        a = _scalar(tensors, alpha, path) if alpha in tensors else None
        groups[(_KOHYA_PREFIX[prefix], module.removeprefix(prefix))] = (key, up, a)
        seen.update((key, up, alpha))
    if stray := [k for k in tensors if k not in seen]:
        raise LoraError(f"{path}: key '{stray[0]}' has no matching lora_down")
    return groups


def _peft_groups(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], path: Path
) -> dict[tuple[str, str], Group]:
    """PEFT keys `<part>.<module>.{lora_A.weight, lora_B.weight}` (+ optional `.alpha`)."""
    alphas = _alpha_from_metadata(metadata, path)
    groups: dict[tuple[str, str], Group] = {}
    seen: set[str] = set()
    for key in tensors:
        prefix = next((p for p in _PEFT_PREFIX if key.startswith(p)), None)
        if prefix is None:
            raise LoraError(f"{path}: key '{key}' is neither a kohya nor a diffusers LoRA key")
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(prefix).removesuffix(".lora_A.weight")
        up, alpha_key = f"{prefix}{module}.lora_B.weight", f"{prefix}{module}.alpha"
        if up not in tensors:
            raise LoraError(f"{path}: key '{key}' has no '{up}'")
        part_alphas = alphas.get(prefix, {})
        alpha = part_alphas.get("")
        for pattern, a in part_alphas.items():
            if pattern and (module == pattern or module.endswith("." + pattern)):
                alpha = a
        if alpha_key in tensors:
            alpha = _scalar(tensors, alpha_key, path)
        groups[(_PEFT_PREFIX[prefix], module)] = (key, up, alpha)
        seen.update((key, up, alpha_key))
    if stray := [k for k in tensors if k not in seen]:
        raise LoraError(f"{path}: key '{stray[0]}' is not a lora_A / lora_B / alpha key")
    return groups
