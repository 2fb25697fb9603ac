"""The draft's catch-up chains that the acceptance walk carries to the next iteration
(`NextChains`) equal the chains read back from the requests' state, whatever finished,
stopped or was cancelled in between (the simulated engine; the real engine's draft-KV reuse
is checked in tests/engine/test_speculation.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import check_catch_up_chains

from adaserve_jax.scheduler.loop import Scheduler
from adaserve_jax.scheduler.request import Request
from adaserve_jax.sim.calibration import load_calibration
from adaserve_jax.sim.engine import SimEngine, VirtualClock
from adaserve_jax.sim.profiles import load_profile


@pytest.mark.parametrize("policy", ["adaserve", "spec:3", "tree:3,2"])
def test_carried_chains_equal_the_requests_state(policy):
    """Many requests of mixed lengths (EOS on some, stop strings on others, one cancelled
    midway) join and leave while the others speculate."""
    prof, cal = load_profile("paper-llama70b"), load_calibration(None)
    clock = VirtualClock()
    eng = SimEngine(prof, cal, num_slots=6, max_len=512, clock=clock, seed=3)
    sched = Scheduler(
        eng, policy=policy, token_budget=128, clock=clock, profile=prof.latency_profile(),
        eos_id=11, decode_text=lambda ids: " ".join(map(str, ids)),
    )  # fmt: skip
    seen = check_catch_up_chains(sched)
    rng = np.random.default_rng(0)
    states = []
    for i in range(14):
        stop = ("7 2",) if i % 4 == 1 else ()
        req = Request(f"r{i}", (1,) * int(rng.integers(4, 40)), int(rng.integers(3, 120)),
                      tpot_slo_ms=(36.0, 60.0, 150.0)[i % 3], stop=stop)  # fmt: skip
        states.append(sched.submit(req))
    steps = 0
    while sched.has_work():
        sched.step()
        steps += 1
        if steps == 12:
            sched.cancel(states[2])
    assert all(s.phase.value == "done" for s in states)
    assert seen["carried"] > 10 and seen["read"] > 0, seen
