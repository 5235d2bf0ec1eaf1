"""Test-only worker entry point: ``python tests/fault_worker.py worker [ldmserve flags]``.

It is ``ldmserve worker`` with faults a job can ask for through its prompt (nothing of
this is in product code):

- prompt ``poison`` (or ``$FAULT_POISON_PROMPT``): the process dies with ``os._exit(1)``
  the moment the engine receives the job, every time, like a job that segfaults its worker;
- prompt starting with ``slow:``: the engine sleeps ``$FAULT_SLOW_STEP_S`` seconds
  (default 1.0) per engine step of its group, like a slow GPU. The sleep is on the engine
  thread, so the worker's heartbeats keep going: slow, but alive.

And one for the whole process: ``$FAULT_DEVICE_BROKEN=1`` makes every UNet call raise the
error a GPU whose context broke raises (``CUDA error: an illegal memory access``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import cli
from service import engine as engine_module
from service.engine import Engine

POISON = os.environ.get("FAULT_POISON_PROMPT", "poison")
SLOW_PREFIX = "slow:"
SLOW_STEP_S = float(os.environ.get("FAULT_SLOW_STEP_S", "1.0"))
DEVICE_BROKEN = os.environ.get("FAULT_DEVICE_BROKEN") == "1"

_submit = Engine.submit
_denoise_step = engine_module.denoise_step
_advance = Engine._advance


def submit(self: Engine, request: Any, *args: Any, **kwargs: Any) -> Any:
    if request.params.prompt == POISON:
        sys.stderr.write(f"fault_worker: poison job {request.id}: crashing\n")
        sys.stderr.flush()
        os._exit(1)
    return _submit(self, request, *args, **kwargs)


def advance(self: Engine, key: Any, out: Any) -> Any:
    """One step of a group: it sleeps first when the group carries a slow job."""
    if any(s.job.request.params.prompt.startswith(SLOW_PREFIX) for s in self._groups[key]):
        time.sleep(SLOW_STEP_S)
    return _advance(self, key, out)


def denoise_step(unet: Any, rows: Any, cache: Any = None) -> Any:
    """The batched UNet step, raising what a GPU whose context broke raises when asked."""
    if DEVICE_BROKEN:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return _denoise_step(unet, rows, cache)


engine_module.denoise_step = denoise_step
Engine.submit = submit  # type: ignore[method-assign]
Engine._advance = advance  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
