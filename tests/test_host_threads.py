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


@pytest.mark.parametrize("side", [8, 64])  # below and above the size worth a second thread
def test_fill_normal_draws_each_rows_own_stream(side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows drawn across threads hold exactly what torch.randn draws from each generator, and
    the generators end where randn leaves them."""
    import threading

    import model.host_threads as host_threads

    threads_used: set[int] = set()
    real = host_threads._fill

    def fill(rows, generators):  # type: ignore[no-untyped-def]
        threads_used.add(threading.get_ident())
        real(rows, generators)

    monkeypatch.setattr(host_threads, "_fill", fill)
    seeds = [3, 1, 4, 1, 5, 9, 2, 6]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    rows = torch.empty(len(seeds), 4, side, side)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_cpu_thread(torch.device("cpu")):
            host_threads.fill_normal(rows, gens)
    finally:
        torch.set_num_threads(before)
    for row, seed, gen in zip(rows, seeds, gens, strict=True):
        ref = torch.Generator().manual_seed(seed)
        assert torch.equal(row[None], torch.randn((1, 4, side, side), generator=ref))
        assert torch.equal(gen.get_state(), ref.get_state())
    assert len(threads_used) == (2 if side == 64 else 1)
    with pytest.raises(ValueError, match="2 rows, 1 generators"):
        host_threads.fill_normal(torch.empty(2, 3), gens[:1])
