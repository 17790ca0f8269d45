"""The cost of the checkpoint checksums (common/checkpoints.py): time of `checksums(state)` against
the time of an Orbax save (until finalised) and restore of the same state, for the DCGAN's
training state and the learned optimizer's meta-state.

    .venv/bin/python -m benchmarks.checkpoint_integrity [--repeats=5]

Writes benchmarks/results/checkpoint_integrity.json (with the machine record).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from benchmarks import machine
from common import checkpoints
from gan import train as gan_train
from learned_optimizers import train as lo_train


def states() -> dict:
    gan = gan_train.create_train_state(gan_train.Config(), jax.random.PRNGKey(0))
    lo_config = lo_train.Config(task="mlp", dataset="digits", meta_batch_size=32)
    family = lo_train.make_family(lo_config, "train")
    lo = jax.jit(lambda key: lo_train.create_train_state(lo_config, family, key))(
        jax.random.PRNGKey(0))
    return {"gan_dcgan": gan, "learned_optimizer_mlp_digits": lo}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(state, repeats: int) -> dict:
    checkpoints.checksums(state)  # compile
    with tempfile.TemporaryDirectory() as root:
        manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=2))
        step = iter(range(1, 10_000))

        def save():
            manager.save(next(step), args=ocp.args.StandardSave(state), force=True)
            manager.wait_until_finished()

        save_s = median_seconds(save, repeats)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        latest = manager.latest_step()
        restore_s = median_seconds(
            lambda: jax.block_until_ready(manager.restore(
                latest, args=ocp.args.StandardRestore(abstract))), repeats)
        manager.close()
    checksum_s = median_seconds(lambda: checkpoints.checksums(state), repeats)
    nbytes = int(sum(x.nbytes for x in jax.tree.leaves(state)))
    return {"bytes": nbytes, "save_s": save_s, "restore_s": restore_s, "checksum_s": checksum_s,
            "checksum_over_save": checksum_s / save_s,
            "checksum_over_restore": checksum_s / restore_s,
            "checksum_gb_per_s": nbytes / checksum_s / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    record = machine.machine_record()
    print(machine.describe(record))
    rows = {name: measure(state, args.repeats) for name, state in states().items()}
    print(f"{'state':32s} {'MB':>7s} {'save s':>8s} {'restore s':>10s} {'checksum s':>11s} "
          f"{'/save':>6s} {'/restore':>9s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['bytes'] / 1e6:7.1f} {r['save_s']:8.3f} {r['restore_s']:10.3f} "
              f"{r['checksum_s']:11.4f} {r['checksum_over_save']:6.3f} "
              f"{r['checksum_over_restore']:9.3f}")
    path = os.path.join(os.path.dirname(__file__), "results", "checkpoint_integrity.json")
    with open(path, "w") as f:
        json.dump({"machine": record, "load_average": os.getloadavg(),
                   "command": "python -m benchmarks.checkpoint_integrity "
                              f"--repeats={args.repeats}", "rows": rows}, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
