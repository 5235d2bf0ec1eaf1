"""Test-only worker entry point: ``python tests/fault_worker.py worker [ldmserve flags]``.

It is ``ldmserve worker`` with two faults a job can ask for through its prompt (nothing of
this is in product code):

- prompt ``poison`` (or ``$FAULT_POISON_PROMPT``): the process dies with ``os._exit(1)``
  the moment the engine receives the job, every time, like a job that segfaults its worker;
- prompt starting with ``slow:``: every UNet call carrying that job first sleeps
  ``$FAULT_SLOW_STEP_S`` seconds (default 1.0), like a slow GPU. The sleep is on the engine
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
from service.engine import Engine

POISON = os.environ.get("FAULT_POISON_PROMPT", "poison")
SLOW_PREFIX = "slow:"
SLOW_STEP_S = float(os.environ.get("FAULT_SLOW_STEP_S", "1.0"))
DEVICE_BROKEN = os.environ.get("FAULT_DEVICE_BROKEN") == "1"

_submit = Engine.submit
_unet_call = Engine._unet_call


def submit(self: Engine, request: Any, *args: Any, **kwargs: Any) -> Any:
    if request.prompt == POISON:
        sys.stderr.write(f"fault_worker: poison job {request.id}: crashing\n")
        sys.stderr.flush()
        os._exit(1)
    return _submit(self, request, *args, **kwargs)


def unet_call(self: Engine, chunk: list[Any]) -> Any:
    if DEVICE_BROKEN:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if any(s.job.request.prompt.startswith(SLOW_PREFIX) for s in chunk):
        time.sleep(SLOW_STEP_S)
    return _unet_call(self, chunk)


Engine.submit = submit  # type: ignore[method-assign]
Engine._unet_call = unet_call  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
