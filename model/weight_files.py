"""Reading weight files lazily: shapes first, tensors one at a time, converted as they arrive.

Architecture detection only needs shapes, so a file is first seen as meta tensors; the
weights a module needs are then read key by key and converted to the target device and
dtype, so a load never holds two full copies of a checkpoint. Pickled checkpoints go through
`torch.load(weights_only=True)` only: never unrestricted unpickling.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from model.weights import CheckpointError

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _check_safetensors_size(path: Path) -> dict[str, tuple[int, int]]:
    """Refuse a truncated safetensors file with a clear reason (the header says how long it is).

    Returns each tensor's (start, end) byte range in the file.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a checkpoint (too short to be a safetensors file)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(
                f"{path}: not a checkpoint, or truncated (bad safetensors header)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(
                f"{path}: not a checkpoint (unreadable safetensors header)"
            ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a checkpoint (unreadable safetensors header)")
    end = max(
        (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
    )
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, header promises {8 + header_len + end})"
        )
    base = 8 + header_len
    return {
        k: (base + int(v["data_offsets"][0]), base + int(v["data_offsets"][1]))
        for k, v in header.items()
        if k != "__metadata__"
    }


class WeightFile:
    """One checkpoint file: its tensors' shapes without reading them, and reading on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        suffix = path.suffix.lower()
        self._pickled: Mapping[str, torch.Tensor] | None = None
        self._meta: dict[str, torch.Tensor] = {}
        self._ranges: dict[str, tuple[int, int]] = {}
        if suffix in SAFETENSORS_SUFFIXES:
            self._ranges = _check_safetensors_size(path)
            try:
                self._handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
            for key in self._handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                sl = self._handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
                self._meta[key] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        elif suffix in PICKLE_SUFFIXES:
            self._pickled = _load_pickled(path)
            self._meta = {
                k: torch.empty(v.shape, dtype=v.dtype, device="meta")
                for k, v in self._pickled.items()
            }
        else:
            raise CheckpointError(
                f"{path}: not a checkpoint (expected .safetensors, .ckpt, .pt, .pth or .bin)"
            )

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors header's free-form metadata (empty for pickled files)."""
        if self._pickled is not None:
            return {}
        return dict(self._handle.metadata() or {})

    def shapes(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor: shapes and dtypes, no data."""
        return self._meta

    def read(
        self,
        keys: Iterable[str],
        *,
        rename: Callable[[str], str] = lambda k: k,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Read `keys`, each converted to device/dtype (floating tensors only) as it is read.

        `channels_last`: 4-D floating tensors (conv weights) come back NHWC. Those are read
        from a safetensors file with plain reads into memory of their own, not through the
        file's memory map: copying out of the map would leave the source pages resident in
        this process next to the copy, two copies of every conv weight.
        """
        unmapped = channels_last and self._pickled is None
        out: dict[str, torch.Tensor] = {}
        with self._open_unmapped() if unmapped else contextlib.nullcontext() as fd:
            for key in keys:
                meta = self._meta[key]
                nhwc = channels_last and meta.dim() == 4 and meta.is_floating_point()
                if self._pickled is not None:
                    tensor = self._pickled[key]
                elif nhwc:
                    tensor = self._read_unmapped(fd, key)
                else:
                    try:
                        tensor = self._handle.get_tensor(key)
                    except (SafetensorError, OSError) as exc:
                        raise CheckpointError(f"{self.path}: cannot read '{key}' ({exc})") from None
                # One conversion for device, dtype and layout: at most one copy per tensor.
                layout = torch.channels_last if nhwc else torch.preserve_format
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(device=device, dtype=dtype, memory_format=layout)
                else:
                    tensor = tensor.to(device=device, memory_format=layout)
                out[rename(key)] = tensor
        return out

    @contextlib.contextmanager
    def _open_unmapped(self) -> Iterator[int]:
        """A plain file descriptor on the file, for the whole of one read() call."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open ({exc})") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _read_unmapped(self, fd: int, key: str) -> torch.Tensor:
        """One safetensors tensor read with os.preadv (little-endian, as the format stores it)."""
        start, end = self._ranges[key]
        meta = self._meta[key]
        if sys.byteorder != "little" or meta.element_size() * meta.numel() != end - start:
            raise CheckpointError(f"{self.path}: cannot read '{key}' (unexpected byte layout)")
        raw = torch.empty(end - start, dtype=torch.uint8)
        view, done = memoryview(raw.numpy()), 0
        try:
            while done < end - start:
                n = os.preadv(fd, [view[done:]], start + done)
                if not n:
                    raise OSError("file ended early")
                done += n
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read '{key}' ({exc})") from None
        return raw.view(meta.dtype).reshape(meta.shape)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _load_pickled(path: Path) -> Mapping[str, torch.Tensor]:
    """torch.load restricted to tensors and plain containers; unwraps Lightning's `state_dict`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles; all mean the same
            raise CheckpointError(
                f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})"
            ) from None
    except Exception as exc:  # pickle.UnpicklingError, EOFError, zipfile errors...
        raise CheckpointError(
            f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: not a checkpoint (holds a {type(obj).__name__}, not weights)"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: not a checkpoint (no tensors in it)")
    return tensors


def find_weights(folder: Path, stem: str) -> Path:
    """The weights of one diffusers component: safetensors preferred, then fp16, then .bin."""
    for name in (
        f"{stem}.safetensors",
        f"{stem}.fp16.safetensors",
        f"{stem}.bin",
        f"{stem}.fp16.bin",
    ):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights ({stem}.safetensors or {stem}.bin)")


def read_json(path: Path) -> dict[str, Any]:
    """A diffusers config file as a dict; a CheckpointError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
