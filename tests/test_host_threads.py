"""The host-side step work runs on one CPU thread and leaves the thread count as it was."""

from __future__ import annotations

import pytest
import torch

from model.host_threads import one_cpu_thread


def test_one_thread_inside_and_restored_after_even_on_error() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_cpu_thread(torch.device("cpu")):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        with one_cpu_thread(torch.device("meta")):  # other devices: the pool is not touched
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
