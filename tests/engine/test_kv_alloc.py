import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from adaserve_jax.engine.kv_alloc import KVCacheError, SlotAllocator


def test_out_of_room_is_a_clear_error_and_changes_nothing():
    a = SlotAllocator(num_slots=2, max_len=10)
    s0 = a.admit("a", 4)
    s1 = a.admit("b", 10)
    with pytest.raises(KVCacheError, match="no free KV slot"):
        a.admit("c", 1)
    with pytest.raises(KVCacheError, match="would need 11 KV rows"):
        a.grow(s0, 7)
    assert a.length(s0) == 4 and a.length(s1) == 10
    with pytest.raises(KVCacheError, match="needs 11 KV rows"):
        SlotAllocator(1, 10).admit("d", 11)
    a.free(s1)
    assert a.admit("c", 3) == s1
    with pytest.raises(KVCacheError, match="not allocated"):
        a.free(7)


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.a = SlotAllocator(num_slots=4, max_len=32)
        self.model: dict[int, tuple[str, int]] = {}
        self.counter = 0

    @rule(n=st.integers(0, 40))
    def admit(self, n):
        self.counter += 1
        rid = f"r{self.counter}"
        if len(self.model) == 4 or n > 32:
            with pytest.raises(KVCacheError):
                self.a.admit(rid, n)
        else:
            slot = self.a.admit(rid, n)
            assert slot not in self.model
            self.model[slot] = (rid, n)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), n=st.integers(0, 20))
    def grow(self, data, n):
        slot = data.draw(st.sampled_from(sorted(self.model)))
        rid, length = self.model[slot]
        if length + n > 32:
            with pytest.raises(KVCacheError):
                self.a.grow(slot, n)
        else:
            assert self.a.grow(slot, n) == length + n
            self.model[slot] = (rid, length + n)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.model)))
        self.a.free(slot)
        del self.model[slot]

    @invariant()
    def matches_model(self):
        assert self.a.used_slots == len(self.model)
        assert self.a.free_slots == 4 - len(self.model)
        for slot, (rid, length) in self.model.items():
            assert self.a.owner(slot) == rid
            assert self.a.length(slot) == length <= 32


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
