"""One process of a 2-process "multi-host" job on one machine (tests/engine/test_mesh.py).

usage: python multihost.py PROCESS_ID NUM_PROCESSES PORT OUT.json

Each process sees 2 forced CPU devices and joins through `jax.distributed.initialize` (the
coordinator is process 0 on localhost:PORT, flags read like serve.py would); both build the
same `Engine(devices=2 * NUM_PROCESSES)` over the global mesh. Process 0 runs the generation
grid (as it would serve gRPC); the others replay its device calls (`Engine.follow`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

pid, nproc, port, out_path = sys.argv[1:5]
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
)

from common import BUCKETS, generate_all, tiny  # noqa: E402

from adaserve_jax import Engine  # noqa: E402
from adaserve_jax.engine.mesh import (  # noqa: E402
    DistributedConfig,
    initialize_distributed,
    is_primary,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    DistributedConfig.add_arguments(parser)
    argv = ["--coordinator-address", f"localhost:{port}", "--num-processes", nproc]
    args = parser.parse_args([*argv, "--process-id", pid])
    assert initialize_distributed(DistributedConfig.from_args(args, env={}))
    import jax

    devices = jax.device_count()
    assert devices == 2 * int(nproc) and jax.local_device_count() == 2, devices
    kw = dict(max_batch=3, token_budget=64, progress=False, policies=("spec:2",), warmup=False)
    engine = Engine(tiny(1), tiny(2, num_layers=1), devices=devices, **kw, **BUCKETS)
    result = {"process": jax.process_index(), "primary": is_primary(), "devices": devices}
    if is_primary():  # drives the scheduler (and would serve gRPC)
        result["tokens"] = generate_all(engine)
        engine.stop_followers()
    else:  # replays process 0's device calls
        result["replayed"] = engine.follow()
    with open(out_path, "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
