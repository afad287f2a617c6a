"""KV slots: a cached prefix is reused only under its own adapter set, in whole blocks, and slots are evicted LRU."""

from __future__ import annotations

from serving.slots import SlotTable


def test_reuse_is_whole_blocks_of_the_same_adapter_set():
    table = SlotTable(2, block=4)
    slot, reuse = table.take((), list(range(10)))
    assert reuse == 0
    slot.tokens, slot.exact = list(range(10)), 8  # blocks [0,4) and [4,8) were evaluated whole
    table.release(slot)
    assert slot.reusable((), list(range(10)), 4) == 8
    assert slot.reusable((), list(range(9)), 4) == 8  # the last prompt token is always evaluated
    assert slot.reusable((), list(range(8)), 4) == 4
    assert slot.reusable((), [0, 1, 2, 3, 4, 99, 6, 7, 8, 9], 4) == 4  # diverges inside the second block
    assert slot.reusable((("a@v1", 1.0),), list(range(10)), 4) == 0  # another adapter set never shares a cache
    assert slot.reusable((("a@v1", 1.0),), list(range(10)), 4) == 0
    again, reuse = table.take((), list(range(12)))
    assert again is slot and reuse == 8 and slot.tokens == list(range(8)) and slot.exact == 8


def test_a_scale_is_part_of_the_key():
    table = SlotTable(1, block=2)
    slot, _ = table.take((("a@v1", 1.0),), [1, 2, 3, 4, 5])
    slot.tokens, slot.exact = [1, 2, 3, 4, 5], 4
    table.release(slot)
    assert slot.reusable((("a@v1", 0.5),), [1, 2, 3, 4, 5], 2) == 0
    assert slot.reusable((("a@v1", 1.0),), [1, 2, 3, 4, 5], 2) == 4


def test_busy_slots_are_never_taken_and_the_least_recently_used_is_evicted():
    table = SlotTable(3, block=2)
    first, _ = table.take((), [1, 2, 3])
    second, _ = table.take((("a@v1", 1.0),), [1, 2, 3])
    third, _ = table.take((("b@v1", 1.0),), [1, 2, 3])
    assert table.take((), [1, 2, 3]) is None  # all busy: the request waits
    for slot in (second, first, third):
        slot.tokens, slot.exact = [1, 2, 3], 2
        table.release(slot)
    evicted, reuse = table.take((("c@v1", 1.0),), [7, 8, 9])
    assert evicted is second and reuse == 0 and evicted.tokens == []  # released first: least recently used
    kept, reuse = table.take((("b@v1", 1.0),), [1, 2, 3])
    assert kept is third and reuse == 2


def test_forget_empties_free_slots_of_an_unloaded_adapter():
    table = SlotTable(2, block=2)
    a, _ = table.take((("a@v1", 1.0), ("b@v1", 1.0)), [1, 2, 3])
    a.tokens, a.exact = [1, 2, 3], 2
    table.release(a)
    busy, _ = table.take((("a@v1", 1.0),), [5, 6])
    assert table.forget("a@v1") == [a]  # the busy one is left to its request
    assert a.adapters == () and a.tokens == [] and busy.adapters == (("a@v1", 1.0),)
