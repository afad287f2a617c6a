"""KV slots: one llama.cpp sequence each, remembering its adapter set and the tokens its cache holds.

A request may reuse a slot's cached prefix only when the slot holds the request's own adapter set, and only up
to a whole prompt block (`block` tokens, aligned to absolute positions) that was evaluated as a block. Prompts
are always evaluated in such blocks, so every prompt token is computed in the same batch shape as in a fresh
process, and a cached answer is the answer a fresh process gives (see serving/engine.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

AdapterSet = tuple[tuple[str, float], ...]  # ((adapter ref "name@vN", scale), ...)
_clock = itertools.count()


@dataclass
class Slot:
    seq: int  # the llama.cpp sequence id
    adapters: AdapterSet = ()
    tokens: list[int] = field(default_factory=list)  # tokens whose keys and values the cache holds, from position 0
    exact: int = 0  # leading tokens evaluated in whole aligned prompt blocks: the part a request may reuse
    busy: bool = False
    used: int = 0  # LRU clock

    def reusable(self, adapters: AdapterSet, prompt: list[int], block: int) -> int:
        """How many leading prompt tokens this slot can serve from its cache (a multiple of `block`)."""
        if self.adapters != adapters:
            return 0
        limit = min(self.exact, len(prompt) - 1)  # the last prompt token is always evaluated: its logits are needed
        common = 0
        for a, b in zip(self.tokens[:limit], prompt[:limit], strict=False):
            if a != b:
                break
            common += 1
        return common // block * block


class SlotTable:
    def __init__(self, n_slots: int, block: int):
        self.slots = [Slot(seq=i) for i in range(n_slots)]
        self.block = block

    def take(self, adapters: AdapterSet, prompt: list[int]) -> tuple[Slot, int] | None:
        """The free slot with the longest reusable prefix, else the least recently used free one; None when all
        are busy. Returns the slot and how many prompt tokens it already holds."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        best = max(free, key=lambda s: (s.reusable(adapters, prompt, self.block), -s.used))
        reuse = best.reusable(adapters, prompt, self.block)
        if reuse == 0:
            best = min(free, key=lambda s: s.used)  # nothing to reuse: evict the least recently used
        best.busy, best.used = True, next(_clock)
        best.adapters = adapters
        best.tokens = best.tokens[:reuse]
        best.exact = reuse
        return best, reuse

    def release(self, slot: Slot) -> None:
        slot.busy, slot.used = False, next(_clock)

    def forget(self, ref: str) -> list[Slot]:
        """Empty the free slots that cache an adapter set with `ref` (being unloaded); the caller clears their cache."""
        dropped = [s for s in self.slots if not s.busy and any(r == ref for r, _ in s.adapters)]
        for slot in dropped:
            slot.adapters, slot.tokens, slot.exact = (), [], 0
        return dropped
