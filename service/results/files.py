"""Results as files in one directory tree (a volume shared by API and workers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

from service.results.base import INPUTS, ResultStore, ResultStoreError


class FileResults(ResultStore):
    """``root/{job}/{lease}-{i}.{fmt}``; writes are atomic (temporary file + rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_absolute():
            raise ValueError(f"file:// result store needs an absolute path, not {root!s}")

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"object name {name!r} leaves the store")
        return path

    def _write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        try:
            await asyncio.to_thread(self._write, name, data)
        except OSError as exc:
            raise ResultStoreError(f"writing {name}: {exc}") from exc

    async def get(self, name: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._path(name).read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ResultStoreError(f"reading {name}: {exc}") from exc

    def _delete(self, names: Sequence[str]) -> None:
        for name in names:
            path = self._path(name)
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty (another run's files): keep it
                path.parent.rmdir()

    async def delete(self, names: Sequence[str]) -> None:
        await asyncio.to_thread(self._delete, names)

    def _sweep(self, older_than_s: float, inputs_older_than_s: float | None) -> int:
        now, removed = time.time(), 0
        if not self.root.is_dir():
            return 0
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            if folder.name == INPUTS:
                if inputs_older_than_s is None:
                    continue
                cutoff = now - inputs_older_than_s
            else:
                cutoff = now - older_than_s
            for path in folder.iterdir():
                with contextlib.suppress(FileNotFoundError):  # another sweeper was first
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
            with contextlib.suppress(OSError):
                folder.rmdir()
        return removed

    async def sweep(self, older_than_s: float, inputs_older_than_s: float | None = None) -> int:
        return await asyncio.to_thread(self._sweep, older_than_s, inputs_older_than_s)
