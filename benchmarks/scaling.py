"""Train-step throughput on 1, 2 and 4 devices, same global batch: the DCGAN step (images/s) and
the MAML meta-step of Omniglot 5-way 1-shot, second order, meta-batch 32 (tasks/s).

    python -m benchmarks.scaling [--devices=1,2,4] [--repeats=5]

On a CPU the "devices" are simulated (`--xla_force_host_platform_device_count`) and share the same
cores, so the table shows the overhead of sharding, not a speed-up. On a GPU/TPU host the same
script gives absolute figures for as many real devices as it has. Each device count runs in its
own subprocess (the device count is fixed when JAX starts). Writes
`benchmarks/results/scaling.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GAN_WORKER = """
import json, sys, time
import jax, numpy as np
from jax.sharding import Mesh
from common import parallel
from gan import train
devices, batch, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
mesh = Mesh(np.asarray(jax.devices()[:devices]), (parallel.DATA_AXIS,))
config = train.Config(model="dcgan", batch_size=batch)
state = parallel.replicate(mesh, train.create_train_state(config, jax.random.PRNGKey(0)))
step = train.jit_train_step(config, mesh)
batch_ = parallel.shard_batch(mesh, np.random.default_rng(0).uniform(
    -1, 1, (1, batch, 28, 28, 1)).astype(np.float32), axis=1)
"""

MAML_WORKER = """
import json, sys, time
import jax, numpy as np
from jax.sharding import Mesh
from common import parallel
from maml import core, tasks, train
devices, batch, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
mesh = Mesh(np.asarray(jax.devices()[:devices]), (parallel.DATA_AXIS,))
config = train.Config(dataset="omniglot", ways=5, shots=1, queries=1, meta_batch_size=batch,
                      inner=core.MetaConfig(lr=0.4, steps=1))
images = np.random.default_rng(0).integers(0, 256, (100, 20, 28, 28), dtype=np.uint8)
state = parallel.replicate(mesh, train.create_train_state(config, jax.random.PRNGKey(0)))
step = train.jit_train_step(config, mesh, train.make_learner(config))
batch_ = parallel.shard_batch(mesh, tasks.episodes(images, 0, 0, batch, 5, 1, 1))
"""

TIMING = """
for _ in range(2):
    state, m = step(state, batch_)
jax.block_until_ready(state)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    state, m = step(state, batch_)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
print(json.dumps({"devices": devices, "platform": jax.devices()[0].platform,
                  "median_step_s": float(np.median(times)),
                  "items_per_s": batch / float(np.median(times))}))
"""

STEPS = {"gan_dcgan_images": (GAN_WORKER, 256), "maml_omniglot_5w1s_tasks": (MAML_WORKER, 32)}


def measure(worker: str, devices: int, batch: int, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO)
    if devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={devices}").strip()
    proc = subprocess.run([sys.executable, "-c", worker + TIMING, str(devices), str(batch),
                           str(repeats)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results",
                                                         "scaling.json"))
    args = parser.parse_args()
    results = {}
    print(f"{'step':>26} {'devices':>8} {'platform':>9} {'step (ms)':>10} {'items/s':>9} "
          f"{'vs 1':>6}")
    for name, (worker, batch) in STEPS.items():
        rows = [measure(worker, int(d), batch, args.repeats) for d in args.devices.split(",")]
        for row in rows:
            row["ratio_to_first"] = row["items_per_s"] / rows[0]["items_per_s"]
            print(f"{name:>26} {row['devices']:>8} {row['platform']:>9} "
                  f"{row['median_step_s'] * 1e3:>10.1f} {row['items_per_s']:>9.1f} "
                  f"{row['ratio_to_first']:>6.2f}")
        results[name] = {"global_batch": batch, "rows": rows}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"benchmark": "scaling", "machine": platform.platform(),
                   "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "repeats": args.repeats,
                   "note": "simulated CPU devices share the same cores: overhead, not speed-up",
                   "steps": results}, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
