"""Strict weight loading shared by every network: build on the meta device, check, assign.

Building on the meta device means loading a checkpoint never holds two full copies of the
weights (random init + loaded); checking keys and shapes first turns a bad checkpoint into a
message that names the file and the first offending key instead of a torch traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the source and the reason."""


def check_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    source: str,
    key_prefix: str = "",
) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"{source}: {what} weights are missing key '{key_prefix}{missing[0]}' ({len(missing)} missing in all)"
        )
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{source}: {what} weights have unexpected key '{key_prefix}{unexpected[0]}' "
            f"({len(unexpected)} unexpected in all)"
        )
    for key, ref in expected.items():
        got = state_dict[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {what} weight '{key_prefix}{key}' has shape {tuple(got.shape)}, "
                f"expected {tuple(ref.shape)}"
            )


def build_module(
    factory: Callable[[], M],
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    key_prefix: str = "",
) -> M:
    """Build `factory()` on the meta device and load `state_dict` into it strictly.

    `key_prefix` is how the checkpoint spells the keys (e.g. `model.diffusion_model.`), so
    messages name the key as the user's file has it. Non-persistent buffers (not in any checkpoint) are re-created by running the factory's
    own initialisation for them only where they are still on the meta device: callers whose
    modules have such buffers must override `reset_non_persistent_buffers` or avoid them.
    """
    with torch.device("meta"):
        module = factory()
    check_state_dict(module, state_dict, what=what, source=source, key_prefix=key_prefix)
    converted = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device))
        for k, v in state_dict.items()
    }
    module.load_state_dict(converted, strict=True, assign=True)
    leftovers = [n for n, b in module.named_buffers() if b.is_meta]
    if leftovers:
        raise CheckpointError(
            f"{source}: {what} has buffers not restored from weights: {leftovers[0]}"
        )
    return module.eval().requires_grad_(False)
