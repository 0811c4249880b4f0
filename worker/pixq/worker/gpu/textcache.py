"""The prompt-embedding cache: each prompt's T5-XXL encoding kept on the device between jobs.

The pipeline then gets ``prompt_embeds`` and ``negative_prompt_embeds`` with their attention masks,
which is the same T5 call the pipeline would make (bit-identical output, tests/test_render_fidelity.py).
``RenderSpeedups.encode`` (pixq.worker.gpu.speedups) fills it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_SEQUENCE_LENGTH = 300  # PixArt-Σ's T5 token budget (the pipeline's default)


@dataclass(frozen=True)
class Encoded:
    """One prompt's T5 output (batch 1) and mask, with its token count."""

    embeds: Any
    mask: Any
    tokens: int


class PromptCache:
    """A thread-safe LRU of ``Encoded`` by (text, max_sequence_length, clean_caption)."""

    def __init__(self, size: int):
        self.size = size
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, int, bool], Encoded] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, bool]) -> Encoded | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return item

    def put(self, key: tuple[str, int, bool], item: Encoded) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
