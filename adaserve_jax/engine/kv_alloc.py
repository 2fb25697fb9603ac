"""Host KV-cache slot allocator: admit, grow, free.

Each running request owns one cache slot (a row of `max_len` KV positions in
every layer). The allocator only does bookkeeping: it never touches device
memory. Every failing call raises `KVCacheError` *before* changing any state,
so one request running out of room can never corrupt another.
"""

from __future__ import annotations

import dataclasses


class KVCacheError(RuntimeError):
    """No free slot, or a request would outgrow its slot."""


@dataclasses.dataclass(slots=True)
class SlotAllocator:
    num_slots: int
    max_len: int
    _lengths: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> reserved rows
    _owners: dict[int, object] = dataclasses.field(default_factory=dict)  # slot -> request id
    _free: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_slots <= 0:
            raise ValueError(f"num_slots={self.num_slots} must be > 0")
        if self.max_len <= 0:
            raise ValueError(f"max_len={self.max_len} must be > 0")
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def length(self, slot: int) -> int:
        self._check_owned(slot)
        return self._lengths[slot]

    def owner(self, slot: int) -> object:
        self._check_owned(slot)
        return self._owners[slot]

    def admit(self, request_id: object, num_tokens: int) -> int:
        """Reserve a slot holding `num_tokens` rows; returns the slot index."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} must be >= 0")
        if num_tokens > self.max_len:
            raise KVCacheError(
                f"request {request_id!r} needs {num_tokens} KV rows but a slot holds {self.max_len}"
            )
        if not self._free:
            raise KVCacheError(
                f"no free KV slot for request {request_id!r} ({self.num_slots} in use)"
            )
        slot = self._free.pop()
        self._lengths[slot] = num_tokens
        self._owners[slot] = request_id
        return slot

    def grow(self, slot: int, num_tokens: int) -> int:
        """Reserve `num_tokens` more rows in `slot`; returns the new length."""
        self._check_owned(slot)
        if num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens} must be >= 0")
        new_len = self._lengths[slot] + num_tokens
        if new_len > self.max_len:
            raise KVCacheError(
                f"request {self._owners[slot]!r} in slot {slot} would need {new_len} KV rows; "
                f"a slot holds {self.max_len}"
            )
        self._lengths[slot] = new_len
        return new_len

    def shrink_to(self, slot: int, length: int) -> None:
        """Release rows past `length` (rejected speculation)."""
        self._check_owned(slot)
        if not 0 <= length <= self._lengths[slot]:
            raise ValueError(f"{length=} must be in [0, {self._lengths[slot]}]")
        self._lengths[slot] = length

    def free(self, slot: int) -> None:
        self._check_owned(slot)
        del self._lengths[slot]
        del self._owners[slot]
        self._free.append(slot)

    def _check_owned(self, slot: int) -> None:
        if slot not in self._lengths:
            raise KVCacheError(f"slot {slot} is not allocated")
