"""A pipeline's LoRA adapters: names resolved in its directory, loaded once, kept within a
byte budget (least recently used dropped first), layers made adaptable as adapters arrive.

A request names adapters (`<name>.safetensors` in the directory); the Python API may also
give a file path. A file that cannot be read or does not fit the model raises LoraError for
the job that asked for it, naming the file and key; nothing else is affected.

Loading has two halves so that a server never stalls its running batch on a file: `read`
(resolve, read and check the file, build the tensors; any thread, touches no layer) and
`admit` (make the layers adaptable, keep the adapter; the thread that runs the networks,
between calls). `prefetch` runs the reads of a job on the library's one loader thread.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.lora_files import (
    TEXT_PARTS,
    LoraError,
    LoraFile,
    Targets,
    read_lora,
    text_targets,
    unet_targets,
)
from model.lora_layers import AdapterSet, LoraSlot, applied, install

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,127}$")  # a name, never a path
SUFFIX = ".safetensors"
CacheKey = tuple[str, int, int]  # (path, mtime_ns, size): a replaced file is read again


def adaptable_networks(unet: nn.Module, text: Any) -> dict[str, nn.Module]:
    """part -> network of a pipeline: the UNet, its text encoder ("text"), or SDXL's two
    towers ("text": CLIP ViT-L, absent in the refiner; "text_2": bigG)."""
    networks = {"unet": unet}
    if hasattr(text, "second"):  # model.text_sdxl.SDXLTextEncoder
        if text.first is not None:
            networks["text"] = text.first.model
        networks["text_2"] = text.second.model
    elif hasattr(text, "model"):
        networks["text"] = text.model
    return networks


class LoraLibrary:
    """Adapters for one pipeline's UNet and text encoder(s)."""

    def __init__(
        self,
        networks: Mapping[str, nn.Module],
        directory: Path | None,
        *,
        budget_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.networks = dict(networks)  # part -> module ("unet", "text", "text_2")
        self.directory = directory
        self.budget_bytes = budget_bytes
        self.device, self.dtype = device, dtype
        self.slots = {part: LoraSlot(part) for part in self.networks}
        self._targets: dict[str, Targets] | None = None
        self._cache: OrderedDict[CacheKey, LoraFile] = OrderedDict()
        self._lock = threading.Lock()  # the cache, shared by the loader thread and admit()
        self._loader: ThreadPoolExecutor | None = None
        self.read_file = read_lora  # how `read` reads a file (tests gate it to make loads slow)

    @property
    def targets(self) -> dict[str, Targets]:
        if self._targets is None:
            self._targets = {
                p: unet_targets(m) if p == "unet" else text_targets(m)
                for p, m in self.networks.items()
            }
        return self._targets

    def names(self) -> list[str]:
        """The adapters a request may name: the directory's `*.safetensors`, by stem."""
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*" + SUFFIX) if NAME.match(p.stem))

    def resolve(self, name: str, *, allow_paths: bool) -> Path:
        """The file a name means; LoraError when there is none."""
        if allow_paths and (name.endswith(SUFFIX) or "/" in name):
            path = Path(name).expanduser()
            if not path.is_file():
                raise LoraError(f"LoRA file {name} does not exist")
            return path.resolve()
        if not NAME.match(name) or self.directory is None:
            raise LoraError(f"unknown LoRA {name!r}: no adapter directory holds it")
        path = self.directory / (name + SUFFIX)
        if not path.is_file():
            raise LoraError(f"unknown LoRA {name!r}: not in {self.directory}")
        return path.resolve()

    def _resident(self, name: str, *, allow_paths: bool) -> tuple[CacheKey, LoraFile | None]:
        """The file's cache key, and its adapter if resident (a stat, no read)."""
        path = self.resolve(name, allow_paths=allow_paths)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            return key, self._cache.get(key)

    def read(self, name: str, *, allow_paths: bool) -> tuple[CacheKey, LoraFile]:
        """The adapter read and checked (the resident one if cached); no layer is touched, so
        any thread may call it."""
        key, cached = self._resident(name, allow_paths=allow_paths)
        if cached is not None:
            return key, cached
        path, mtime, size = key
        adapter = self.read_file(Path(path), self.targets, device=self.device, dtype=self.dtype)
        return key, replace(adapter, key=f"{path}@{mtime}:{size}")

    def admit(self, key: CacheKey, adapter: LoraFile) -> LoraFile:
        """A read adapter made resident: its layers made adaptable (cheap; call it on the thread
        that runs the networks, never during a call), kept within the budget."""
        with self._lock:
            if key in self._cache:  # resident (or read twice meanwhile: the resident copy wins)
                self._cache.move_to_end(key)
            else:
                for part, weights in adapter.parts.items():
                    install(self.networks[part], list(weights), self.slots[part])
                self._cache[key] = adapter
                log.info("LoRA %s loaded (%d bytes)", key[0], adapter.nbytes)
            # Jobs running with a dropped adapter keep their reference; it is freed after them.
            while len(self._cache) > 1 and self.cached_bytes() > self.budget_bytes:
                dropped = self._cache.popitem(last=False)[1]
                log.info("LoRA %s dropped (budget %d bytes)", dropped.key, self.budget_bytes)
            return self._cache[key]

    def load(self, name: str, *, allow_paths: bool = True) -> LoraFile:
        """The adapter, read at most once while it stays within the budget (this thread)."""
        return self.admit(*self.read(name, allow_paths=allow_paths))

    def prefetch(self, specs: Sequence[Mapping[str, Any]], *, allow_paths: bool) -> PendingAdapters:
        """A job's [{"name", "scale"}] read on the loader thread; `PendingAdapters.adapter_set`
        admits them once `done()`. Done at once when all are resident or a name is unknown."""
        pairs = [(str(s["name"]), float(s.get("scale", 1.0))) for s in specs]
        now: Future[list[tuple[CacheKey, LoraFile, float]]] = Future()
        try:
            resident = [(*self._resident(n, allow_paths=allow_paths), s) for n, s in pairs]
        except LoraError as exc:
            now.set_exception(exc)
            return PendingAdapters(self, now)
        if all(a is not None for _, a, _ in resident):
            now.set_result(resident)  # type: ignore[arg-type]
            return PendingAdapters(self, now)
        if self._loader is None:
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="lora-loader")

        def read_all() -> list[tuple[CacheKey, LoraFile, float]]:
            return [(*self.read(n, allow_paths=allow_paths), scale) for n, scale in pairs]

        return PendingAdapters(self, self._loader.submit(read_all))

    def cached_bytes(self) -> int:
        return sum(a.nbytes for a in self._cache.values())

    def adapter_set(self, specs: Sequence[Mapping[str, Any]], *, allow_paths: bool) -> AdapterSet:
        """[{"name", "scale"}] -> the loaded adapters with their multipliers."""
        return tuple(
            (self.load(str(s["name"]), allow_paths=allow_paths), float(s.get("scale", 1.0)))
            for s in specs
        )

    @contextmanager
    def applied(self, part: str, per_row: Sequence[AdapterSet] | None) -> Iterator[None]:
        """The rows' adapters active in `part` for one call."""
        with applied(self.slots[part], per_row, self.device):
            yield

    @contextmanager
    def text_applied(self, adapters: AdapterSet) -> Iterator[None]:
        """One adapter set active in every text encoder, on every row of their calls."""
        with contextlib.ExitStack() as stack:
            for part in TEXT_PARTS:
                if part in self.slots:
                    stack.enter_context(
                        applied(self.slots[part], None, self.device, every=adapters)
                    )
            yield


@dataclass(frozen=True)
class PendingAdapters:
    """A job's adapters being read off the caller's thread."""

    library: LoraLibrary
    future: Future[list[tuple[CacheKey, LoraFile, float]]]

    def done(self) -> bool:
        return self.future.done()

    def adapter_set(self) -> AdapterSet:
        """The admitted adapters (waits for the reads); LoraError naming the file and key."""
        return tuple((self.library.admit(k, a), scale) for k, a, scale in self.future.result())


def text_signature(adapters: AdapterSet) -> tuple[tuple[str, float], ...]:
    """What of a row's adapters changes its text embedding (a prompt cache key part)."""
    return tuple((a.key, scale) for a, scale in adapters if any(map(a.weights, TEXT_PARTS)))
