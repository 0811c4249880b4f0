"""How a loaded AOT graph is called: aligned inputs, and on a GPU the wait for call k-2 outside the loader."""

from __future__ import annotations

import torch
from pixq.worker.gpu.aot import ALIGN, InFlight, aligned


def test_aligned_copies_only_a_misaligned_input():
    timesteps = torch.arange(20, dtype=torch.int64)
    odd = timesteps[1:2]  # fast mode's conditional half: a slice that starts 8 bytes into the storage
    assert odd.data_ptr() % ALIGN != 0
    fixed = aligned(odd)
    assert fixed.data_ptr() % ALIGN == 0 and fixed.is_contiguous() and torch.equal(fixed, odd)
    whole = torch.randn(2, 4)
    assert aligned(whole).data_ptr() == whole.data_ptr()  # no copy when nothing is wrong
    strided = torch.randn(4, 6)[:, ::2]
    assert aligned(strided).is_contiguous() and torch.equal(aligned(strided), strided)


class Event:
    """A stand-in for ``torch.cuda.Event`` that records the order of records and waits."""

    log: list[str] = []

    def __init__(self):
        self.n = sum(entry.startswith("record") for entry in Event.log)

    def record(self):
        Event.log.append(f"record {self.n}")

    def synchronize(self):
        Event.log.append(f"wait {self.n}")


def test_in_flight_waits_for_the_call_two_before():
    Event.log = []
    flight = InFlight(2, Event)
    for call in range(4):
        flight.before_call()
        Event.log.append(f"call {call}")
        flight.after_call()
    assert Event.log == ["call 0", "record 0", "call 1", "record 1",
                         "wait 0", "call 2", "record 2", "wait 1", "call 3", "record 3"]
