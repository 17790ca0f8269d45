"""MAML benchmark: meta-steps/s of our jitted meta-step vs an independent PyTorch MAML, where the
time goes, peak memory vs inner steps, and the accuracies of finished *_cpu runs.

    .venv/bin/python -m benchmarks.maml [--repeats=3] [--steps=3] [--runs_dir=runs]

PyTorch (`torch==2.13.0` CPU build, the `[bench]` extra): the same Conv4 (bias-free convolutions,
offset-only batch-statistics norm, spatial mean, linear head) and the same meta-step written the
usual way -- a Python loop over tasks, `torch.autograd.grad(create_graph=not first_order)` in the
inner loop, the mean query loss backpropagated, Adam. Both run on the same episodes, alternating
in this invocation, so contention from other processes hits both alike.

Ours runs under the CPU settings `launch/maml.py` gives its users (`common/cpu_settings.py`);
PyTorch's process inherits them (its hugetlb malloc made PyTorch's 20-way step as fast or faster,
measured). PyTorch runs in a child process with its own OpenMP setting
(`--torch_omp_wait_policy`, default ACTIVE: its worker threads spin between parallel regions, its
fastest setting on an idle machine; the comparison of the policies is in benchmarks/README.md).
Spinning threads would take the cores from our step if they shared its process, so the child is
stopped (SIGSTOP) while ours is timed and continued (SIGCONT) for its own turn. Measure on an
idle machine: with another job on the same cores, ACTIVE's spinning threads collapse; on a shared
machine pass `--torch_omp_wait_policy=PASSIVE`. Writes benchmarks/results/maml.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import signal
import time

if __name__ == "__main__":  # the launcher's CPU settings (common/cpu_settings.py), before JAX starts
    from common import cpu_settings
    cpu_settings.apply_before_jax()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import machine, roofline, xla_profile  # noqa: E402
from common import cpu_settings, parallel, task_gradients  # noqa: E402
from launch import flags as launch_flags  # noqa: E402
from launch import maml as launch_maml  # noqa: E402
from maml import core, tasks, train  # noqa: E402

SETTINGS = {  # name: (ways, shots, meta-batch, inner steps, inner lr)
    "5way1shot": (5, 1, 32, 1, 0.4),
    "20way1shot": (20, 1, 16, 5, 0.1),
}
PROTONET_FLAGS = "launch/configs/maml_protonet_omniglot_20way1shot.flags"


# ------------------------------------------------------------------------------------------------
# The PyTorch reference


def torch_maml(ways: int, inner_steps: int, inner_lr: float, first_order: bool, filters=64):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    shapes = [(filters, 1, 3, 3)] + [(filters, filters, 3, 3)] * 3
    weights = [torch.randn(s, generator=gen) * (1.0 / np.sqrt(np.prod(s[1:]))) for s in shapes]
    weights += [torch.randn(filters, ways, generator=gen) / np.sqrt(filters), torch.zeros(ways)]
    offsets = [torch.zeros(filters) for _ in range(4)]
    fast = [w.requires_grad_() for w in weights]
    slow = [o.requires_grad_() for o in offsets]
    optimizer = torch.optim.Adam(fast + slow, lr=1e-3)

    def forward(params, x):
        for i in range(4):
            if x.shape[-1] % 2:  # "SAME" for stride 2: odd sizes pad 1 | 1, even 0 | 1
                x = F.conv2d(x, params[i], stride=2, padding=1)
            else:
                x = F.conv2d(F.pad(x, (0, 1, 0, 1)), params[i], stride=2)
            x = F.relu(F.batch_norm(x, None, None, None, slow[i], training=True, eps=1e-3))
        return x.mean((2, 3)) @ params[4] + params[5]

    def step(support_x, support_y, query_x, query_y):
        optimizer.zero_grad()
        total = 0.0
        for t in range(support_x.shape[0]):
            params = fast
            for _ in range(inner_steps):
                loss = F.cross_entropy(forward(params, support_x[t]), support_y[t])
                grads = torch.autograd.grad(loss, params, create_graph=not first_order)
                params = [p - inner_lr * g for p, g in zip(params, grads)]
            query_loss = F.cross_entropy(forward(params, query_x[t]), query_y[t])
            (query_loss / support_x.shape[0]).backward()
            total += float(query_loss.detach())
        optimizer.step()
        return total / support_x.shape[0]

    return step


def to_torch(batch):
    import torch
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3)))  # noqa: E731
    return (nchw(batch["support"]["x"]), torch.from_numpy(batch["support"]["y"].astype(np.int64)),
            nchw(batch["query"]["x"]), torch.from_numpy(batch["query"]["y"].astype(np.int64)))


def torch_worker(conn, omp_wait_policy: str, ways, inner_steps, inner_lr, first_order, batch):
    """The PyTorch side, in its own process: ("time", n) -> seconds per step over n steps,
    ("profile",) -> top ops of one step, None -> exit."""
    if omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = omp_wait_policy  # read when libgomp loads, with torch
    step = torch_maml(ways, inner_steps, inner_lr, first_order)
    arrays = to_torch(batch)
    step(*arrays)  # warm-up
    conn.send("ready")
    while (command := conn.recv()) is not None:
        if command[0] == "time":
            conn.send(seconds_per_step(lambda a: step(*a), arrays, command[1]))
        else:
            conn.send(torch_profile(step, arrays))


class TorchReference:
    """A `torch_worker` process, stopped except while it is asked for something."""

    def __init__(self, omp_wait_policy: str, *args):
        self.conn, child = multiprocessing.get_context("spawn").Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=torch_worker, args=(child, omp_wait_policy, *args), daemon=True)
        self.process.start()
        self.conn.recv()  # warmed up
        os.kill(self.process.pid, signal.SIGSTOP)

    def ask(self, *command):
        os.kill(self.process.pid, signal.SIGCONT)
        self.conn.send(command)
        answer = self.conn.recv()
        os.kill(self.process.pid, signal.SIGSTOP)
        return answer

    def close(self):
        os.kill(self.process.pid, signal.SIGCONT)
        self.conn.send(None)
        self.process.join()


# ------------------------------------------------------------------------------------------------
# Ours


def our_config(name: str, first_order: bool, task_batching="auto", conv_impl="auto"):
    ways, shots, batch, steps, lr = SETTINGS[name]
    return train.Config(dataset="omniglot", ways=ways, shots=shots, queries=shots,
                        meta_batch_size=batch,
                        inner=core.MetaConfig(steps=steps, lr=lr, first_order=first_order,
                                              task_batching=task_batching),
                        conv_impl=conv_impl)


def our_step(config: train.Config):
    mesh = parallel.make_mesh()
    state = parallel.replicate(mesh, train.create_train_state(config, jax.random.PRNGKey(0)))
    step = train.jit_train_step(config, mesh, train.make_learner(config))
    holder = {"state": state}

    def run(batch):
        holder["state"], out = step(holder["state"], batch)
        return float(out["meta_loss"])

    return run, lambda b: parallel.shard_batch(mesh, b), step, holder


def seconds_per_step(run, batch, steps: int) -> float:
    """Wall seconds per call of `run(batch)` (which waits for its result), over `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        run(batch)
    return (time.perf_counter() - start) / steps


def task_batching_speed(data, name: str, first_order: bool, rounds: int, steps: int) -> dict:
    """Seconds per meta-step of the same step with the tasks vmapped and mapped (a `lax.scan`
    summing the tasks' gradients), timed alternately in this process, `rounds` rounds of `steps`
    steps: how "auto" is chosen."""
    ways, shots, meta_batch, _, _ = SETTINGS[name]
    batch = tasks.episodes(data, 0, 0, meta_batch, ways, shots, shots)
    runs = {}
    for batching in ("vmap", "map"):
        run, put, _, _ = our_step(our_config(name, first_order, batching))
        on_device = put(batch)
        run(on_device)  # compile
        runs[batching] = (run, on_device)
    seconds = {batching: [] for batching in runs}
    for _ in range(rounds):
        for batching, (run, on_device) in runs.items():
            seconds[batching].append(seconds_per_step(run, on_device, steps))
    return {**{f"seconds_per_step_{b}": v for b, v in seconds.items()},
            "map_speedup": float(np.median(seconds["vmap"]) / np.median(seconds["map"]))}


def protonet_speed(data, rounds: int, steps: int, peak: float) -> dict:
    """Training episodes per second of Prototypical Networks with the committed config's training
    episodes (60-way 1-shot, 5 queries per class, one episode per update)."""
    launch_flags.parse_flagfile(PROTONET_FLAGS)
    config = dataclasses.replace(launch_maml.make_config(), data_dir=None)
    ways, queries = config.train_ways or config.ways, config.train_queries or config.queries
    batch = tasks.episodes(data, 0, 0, config.meta_batch_size, ways, config.shots, queries)
    run, put, step, holder = our_step(config)
    on_device = put(batch)
    run(on_device)  # compile
    seconds = [seconds_per_step(run, on_device, steps) for _ in range(rounds)]
    median = float(np.median(seconds))
    flops = flops_and_memory(step, holder, on_device)["flops"]
    return {"flags": PROTONET_FLAGS, "train_ways": ways, "shots": config.shots,
            "queries": queries, "seconds_per_step": seconds,
            "episodes_per_s": config.meta_batch_size / median, "flops_per_step": flops,
            "achieved_flops_per_s": flops / median, "matmul_peak_flops_per_s": peak,
            "fraction_of_matmul_peak": flops / median / peak}


def flops_and_memory(step, holder, batch) -> dict:
    compiled = step.lower(holder["state"], batch).compile()
    memory = compiled.memory_analysis()
    return {"flops": roofline.compiled_cost(compiled)["flops"],
            "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1))}


def stage_table(config: train.Config, batch_np) -> dict[str, float]:
    """Seconds of the stages of our step (each jitted alone): forward of all tasks, the inner
    adaptation (support forward + backward), and the full meta-gradient."""
    learner = train.make_learner(config)
    meta_config = config.inner
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    mp = state.meta_params
    batch = jax.device_put(batch_np)
    fns = {
        "query forward (all tasks)": jax.jit(jax.vmap(
            lambda mp, t: learner.query_loss(mp["fast"], mp["slow"], t["support"], t["query"])[0],
            in_axes=(None, 0))),
        "inner adaptation (all tasks)": jax.jit(jax.vmap(
            lambda mp, t: core.adapt(mp["fast"], t["support"],
                                     lambda f, b: learner.support_loss(f, mp["slow"], b),
                                     mp["inner_lr"], meta_config.steps,
                                     meta_config.first_order), in_axes=(None, 0))),
        "meta-gradient (full)": jax.jit(lambda mp, b: core.meta_gradient(
            mp, b, jnp.ones(1), learner, meta_config)),
    }
    out = {}
    for name, f in fns.items():
        jax.block_until_ready(f(mp, batch))
        t = time.perf_counter()
        jax.block_until_ready(f(mp, batch))
        out[name] = time.perf_counter() - t
    return out


def torch_profile(step, batch) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(*batch)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6,
             "share": e.self_cpu_time_total / total} for e in rows]


def accuracies(runs_dir: str) -> dict:
    found = {}
    if not os.path.isdir(runs_dir):
        return found
    for name in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, name, "results.json")
        if name.startswith("maml") and os.path.exists(path):
            with open(path) as f:
                results = json.load(f)
            rows = [json.loads(line) for line in open(os.path.join(runs_dir, name,
                                                                    "metrics.jsonl"))]
            found[name] = {"results": results, "meta_iterations": rows[-1]["step"] if rows else 0,
                           "meta_training_seconds": training_seconds(rows)}
    return found


def training_seconds(rows: list[dict]) -> float:
    """Wall time of the meta-training loop from its logged rates: each row's steps since the
    previous row over its steps/s. Compilation and the final evaluation are not included; for a
    resumed run the steps repeated after the kill are counted once."""
    total, last = 0.0, 0
    for row in rows:
        if row.get("steps_per_s"):
            total += (row["step"] - last) / row["steps_per_s"]
        last = row["step"]
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--settings", default="5way1shot,20way1shot",
                        help="speed settings to time (the others' results in --out are kept)")
    parser.add_argument("--orders", default="second,first", help="meta-gradient orders to time")
    parser.add_argument("--memory_steps", default="1,5,10")
    parser.add_argument("--compare_task_batching", action="store_true",
                        help="also time vmap against map (the scan summing the tasks' "
                             "gradients) for each setting and order")
    parser.add_argument("--protonet", action=argparse.BooleanOptionalAction, default=True,
                        help="time Prototypical Networks' training episodes")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="per-op profiles of the second-order steps (needs tensorflow's "
                             "profiler protos, the [bench] extra)")
    parser.add_argument("--out", default="benchmarks/results/maml.json")
    parser.add_argument("--torch_omp_wait_policy", default="ACTIVE",
                        help="OMP_WAIT_POLICY of the PyTorch process (ACTIVE, PASSIVE, or '' for "
                             "libgomp's default)")
    args = parser.parse_args()
    import torch  # noqa: F401  (fails early without the [bench] extra)

    data = np.random.default_rng(0).integers(0, 256, (200, 20, 28, 28), np.uint8)
    peak = roofline.matmul_peak_flops(n=1024)
    results = {"machine": machine.machine_record(),
               "versions": {"jax": jax.__version__, "torch": torch.__version__,
                            "torch_omp_wait_policy": args.torch_omp_wait_policy,
                            "numpy": np.__version__},
               "flags": vars(args), "matmul_peak_flops_per_s": peak, "speed": {},
               "environment": cpu_settings.recorded(os.environ)}
    if os.path.exists(args.out):  # rows not measured this time stay as they were
        with open(args.out) as f:
            kept = json.load(f)
        results["speed"] = kept.get("speed", {})
        for key in ("peak_memory_bytes_vs_inner_steps", "peak_memory_note", "accuracies",
                    "task_batching_comparison", "speed_earlier_machine_model_not_recorded",
                    "protonet_speed"):
            if key in kept:
                results[key] = kept[key]
        if not args.settings:  # no speed row measured: keep the conditions the kept rows had
            for key in ("machine", "versions", "flags", "matmul_peak_flops_per_s", "environment"):
                if key in kept:
                    results[key] = kept[key]
    print(f"matmul peak (1024^2, jax, this invocation): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'setting':22s} {'ours s/step':>12s} {'torch s/step':>12s} {'ratio':>7s} "
          f"{'paired':>7s} {'GFLOP/s':>8s}")
    for name in filter(None, args.settings.split(",")):
        ways, shots, meta_batch, _, _ = SETTINGS[name]
        for first_order in [order == "first" for order in args.orders.split(",")]:
            config = our_config(name, first_order)
            batch = tasks.episodes(data, 0, 0, meta_batch, ways, shots, shots)
            ours, put, step, holder = our_step(config)
            theirs = TorchReference(args.torch_omp_wait_policy, ways, config.inner.steps,
                                    config.inner.lr, first_order, batch)
            on_device = put(batch)
            ours(on_device)  # compile
            times = {"ours": [], "torch": []}
            for _ in range(args.repeats):
                times["ours"].append(seconds_per_step(ours, on_device, args.steps))
                times["torch"].append(theirs.ask("time", args.steps))
            s_ours, s_torch = float(np.median(times["ours"])), float(np.median(times["torch"]))
            # Each round times ours and then PyTorch's: the median of the rounds' ratios cancels
            # the slow spells of a shared machine that the ratio of the medians keeps.
            paired = float(np.median(np.array(times["torch"]) / np.array(times["ours"])))
            # FLOPs of the loop-free (vmap) form of the same step: XLA's cost analysis counts a
            # loop body once, so the map's count would be one task's.
            _, _, vmap_step, vmap_holder = our_step(our_config(name, first_order, "vmap"))
            cost = flops_and_memory(vmap_step, vmap_holder, on_device)
            key = f"{name}_{'first' if first_order else 'second'}_order"
            results["speed"][key] = {
                "meta_batch": meta_batch, "inner_steps": config.inner.steps,
                "conv_impl": train.resolve_conv_impl(config.conv_impl),
                "task_batching": task_gradients.resolve_task_batching(config.inner.task_batching),
                "seconds_per_step_ours": times["ours"], "seconds_per_step_torch": times["torch"],
                "meta_steps_per_s_ours": 1 / s_ours, "meta_steps_per_s_torch": 1 / s_torch,
                "ratio": s_torch / s_ours, "ratio_paired_median": paired,
                "flops_per_step": cost["flops"],
                "load_average": os.getloadavg(),
                "achieved_flops_per_s": cost["flops"] / s_ours,
                "fraction_of_matmul_peak": cost["flops"] / s_ours / peak}
            print(f"{key:22s} {s_ours:12.3f} {s_torch:12.3f} {s_torch / s_ours:7.2f} {paired:7.2f} "
                  f"{cost['flops'] / s_ours / 1e9:8.1f}", flush=True)
            if not first_order and args.profile:
                results["speed"][key]["stages_ours_s"] = stage_table(config, batch)
                ops = xla_profile.op_profile(
                    lambda: [ours(on_device) for _ in range(args.steps)],
                    step.lower(holder["state"], on_device).compile().as_text(), args.steps,
                    top=None)
                results["speed"][key]["ours_top_ops"] = ops[:15]
                results["speed"][key]["ours_time_by_op_kind"] = xla_profile.by_kind(ops)
                print_ops(results["speed"][key]["ours_time_by_op_kind"])
                results["speed"][key]["torch_top_ops"] = theirs.ask("profile")
            theirs.close()
            write(args.out, results)
    for name in filter(None, args.settings.split(",") if args.compare_task_batching else []):
        for first_order in [order == "first" for order in args.orders.split(",")]:
            key = f"{name}_{'first' if first_order else 'second'}_order"
            row = task_batching_speed(data, name, first_order, args.repeats, args.steps)
            results.setdefault("task_batching_comparison", {})[key] = row
            print(f"{key:26s} vmap / map seconds per step: {row['map_speedup']:.2f}", flush=True)
            write(args.out, results)
    if args.protonet:
        results["protonet_speed"] = dict(protonet_speed(data, args.repeats, args.steps, peak),
                                         machine=machine.machine_record())
        row = results["protonet_speed"]
        print(f"Prototypical Networks, {row['train_ways']}-way {row['shots']}-shot training "
              f"episodes: {row['episodes_per_s']:.2f} episodes/s, "
              f"{row['fraction_of_matmul_peak']:.2f} of the matmul peak", flush=True)
        write(args.out, results)
    name = "5way1shot"
    ways, shots, meta_batch, _, _ = SETTINGS[name]
    batch = tasks.episodes(data, 0, 0, meta_batch, ways, shots, shots)
    memory_steps = [int(s) for s in args.memory_steps.split(",") if s]
    if memory_steps:
        results["peak_memory_bytes_vs_inner_steps"] = {}
    for steps in memory_steps:
        config = our_config(name, False)
        config = dataclasses.replace(config, inner=dataclasses.replace(config.inner, steps=steps))
        _, put, step, holder = our_step(config)
        temp = flops_and_memory(step, holder, put(batch))["temp_bytes"]
        results["peak_memory_bytes_vs_inner_steps"][steps] = temp
        results["peak_memory_note"] = ("XLA's memory analysis of the compiled meta-step: temporary "
                                       "buffers, the peak beyond parameters and the batch")
        print(f"5-way 1-shot meta-batch 32, second order, {steps:2d} inner steps: XLA temp "
              f"buffers {temp / 2**20:.1f} MiB", flush=True)
        write(args.out, results)
    results["accuracies"] = accuracies(args.runs_dir) or results.get("accuracies", {})
    for run, value in results["accuracies"].items():
        print(run, value)
    write(args.out, results)
    print("wrote", args.out)


def print_ops(kinds: list[dict]) -> None:
    print(f"  {'ms/step':>8s} {'share':>6s} {'ops':>4s}  kind (HLO opcode, JAX source op)")
    for kind in kinds:
        print(f"  {kind['ms_per_step']:8.1f} {kind['fraction']:6.1%} {kind['count']:4d}  "
              f"{kind['kind']}")


def write(path: str, results: dict) -> None:
    """Writes what is measured so far (a long benchmark leaves partial results if stopped)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
