"""Benchmark of the LSTM optimizer: final losses vs. tuned baselines over meta-training seeds, and
meta-training speed and memory as a function of the unroll length.

    python -m benchmarks.learned_optimizer --seeds=0,1,2

For each config (a launch/configs/*.flags file) and seed, meta-trains in <root>/<config>/seed<k>
(resuming if already there) and evaluates; the table gives, per config, task family and horizon,
each optimizer's mean final loss over test tasks (mean ± sd over seeds), the LSTM's ratio to the
best-tuned Adam and its rank among the five. Speed: meta-steps/s and the compiled step's
temporary memory for several unroll lengths, with plain Adam task-steps/s on the same tasks
timed in the same invocation as the baseline of the ratio. It runs under the CPU settings
`launch/learned_optimizer.py` gives its users (`common/cpu_settings.py`).

Remedies: `--variant=NAME:--flag=value` measures the configs with extra flags as rows of their own
(<config>_NAME), with a picture of every run's validation loss against meta-steps;
`--gradient_by_unroll=<workdir>` measures how much each unroll of a horizon weighs in the
meta-gradient, per meta-objective.
"""

from __future__ import annotations

if __name__ == "__main__":  # the launcher's CPU settings (common/cpu_settings.py), before JAX starts
    from common import cpu_settings
    cpu_settings.apply_before_jax()

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import machine, roofline  # noqa: E402
from benchmarks.learned_optimizer_rows import (  # noqa: E402
    command, devices, quality_rows, row_key, rows_with_added_seeds)
from common import cpu_settings  # noqa: E402
from common import images, metrics  # noqa: E402
from launch import flags as launch_flags  # noqa: E402
from launch import learned_optimizer as launcher  # noqa: E402
from learned_optimizers import evaluate, lstm, tasks, train  # noqa: E402

flags.DEFINE_list("configs", ["lstm_quadratic", "lstm_quadratic_second_order", "lstm_mlp_digits"],
                  "Config files to run.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Meta-training seeds.")
flags.DEFINE_multi_string("variant", [], "A remedy measured as rows of its own: NAME or "
                          "'NAME:--flag=value --flag=value'. Its runs are <root>/<config>_NAME/"
                          "seed<k>, launched with the config file's flags and then these; its rows "
                          "are named <config>_NAME. Repeatable; none: the configs as committed.")
flags.DEFINE_string("root", "/tmp/learned_optimizer_benchmark", "Where the runs' workdirs go.")
flags.DEFINE_list("unroll_lengths", ["5", "10", "20", "40"], "Unroll lengths of the speed table.")
flags.DEFINE_string("speed_config", "lstm_mlp_digits", "Config whose meta-step is timed.")
flags.DEFINE_integer("speed_steps", 5, "Timed meta-steps per unroll length.")
flags.DEFINE_string("meta_step_config", "",
                    "Config whose meta-step is timed against the machine's matmul peak "
                    "(e.g. lstm_mlp_mnist28; '' skips it).")
flags.DEFINE_list("task_batchings", ["vmap", "map"], "Task batchings of that table (the first is "
                  "the reference of speedup_over_first).")
flags.DEFINE_integer("meta_step_rounds", 3, "Alternating timing rounds of that table.")
flags.DEFINE_string("gradient_by_unroll", "",
                    "A finished run's workdir: the meta-gradient's norm at each unroll position of "
                    "a horizon, for each meta-objective, at its saved meta-parameters ('' skips "
                    "it).")
flags.DEFINE_bool("reevaluate", False,
                  "Recompute each finished run's eval.json from its meta_params.npz with the "
                  "current evaluation (e.g. a wider baseline grid) instead of reading it.")
flags.DEFINE_string("trained_on", "",
                    "Where the runs were meta-trained, recorded with their rows (default: "
                    "this machine's JAX devices).")
flags.DEFINE_bool("add_seeds", False,
                  "Add these seeds to the rows of the same configs already in --output (seeds "
                  "whose workdirs are gone) instead of replacing them; see `rows_with_added_seeds`.")
flags.DEFINE_string("note", "", "Free text stored with the results (e.g. what was not run).")
flags.DEFINE_string("output", os.path.join(os.path.dirname(__file__), "results",
                                           "learned_optimizer.json"), "Result file.")
FLAGS = flags.FLAGS
FLAGS.set_default("workdir", "unused")  # the launcher's required flag; runs go under --root
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch",
                          "configs")


# The meta-objective the rows were trained on (by `meta_objective`): `tasks.scored_unroll`'s
# losses after every update, or their logarithms.
OBJECTIVES = {
    "loss": "f(theta_{s+1})..f(theta_{s+K}) per unroll from step s (every update credited)",
    "log_loss": "log f(theta_{s+1})..log f(theta_{s+K}) per unroll from step s"}


def config_from_file(name: str, extra_flags=(), **overrides) -> train.Config:
    """The Config a `--flagfile=launch/configs/<name>.flags <extra_flags>` launch would build (this
    re-parses, so resets, every flag: read the benchmark's own flags before calling it)."""
    launch_flags.parse_flagfile(os.path.join(CONFIG_DIR, name + ".flags"), extra_flags)
    return dataclasses.replace(launcher.make_config(), **overrides)


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'NAME:--a=1 --b=2' -> ('NAME', ['--a=1', '--b=2']); 'NAME' -> ('NAME', [])."""
    name, _, extra = spec.partition(":")
    return name, extra.split()


def validation_curve(workdir: str) -> list[list[float]]:
    """[[meta-step, validation f(θ_T)], ...] of a run's metrics (the rows that validated)."""
    return [[row["step"], row["validation_loss"]] for row in metrics.read_metrics(workdir)
            if row.get("validation_loss") is not None]


def plot_validation(path: str, name: str, curves: dict[str, list[list[float]]]) -> str:
    """Validation f(θ_T) against meta-steps of each run (label -> curve): the same validation
    tasks for every seed and variant, so the curves compare."""
    return images.save_curves(
        path, {label: tuple(zip(*curve)) for label, curve in curves.items() if curve},
        xlabel="meta-step", ylabel="validation loss f(θ_T), mean over tasks",
        title=f"{name}: meta-training runs")


def reevaluate(workdir: str) -> None:
    """eval.json of a finished run recomputed from its saved φ and config."""
    config = train.read_config(workdir)
    meta_params, _ = lstm.load(os.path.join(workdir, train.META_PARAMS_FILE))
    train.evaluate_run(config, meta_params, workdir,
                       max(r["step"] for r in metrics.read_metrics(workdir)))


def quality(config_names, seeds, root: str, results_dir: str, again: bool, trained_on: str,
            variants=()) -> dict:
    """Rows per config (and `variants`, `parse_variant`), family and horizon: each seed's run
    meta-trained in its workdir (resumed) unless it has its eval.json, then the mean ± sd over
    seeds; pictures of the test curves and, with variants, of the validation curves."""
    out = {}
    for name in config_names:
        validation = {}
        for variant, extra_flags in [parse_variant(v) for v in variants] or [("", [])]:
            run_name = f"{name}_{variant}" if variant else name
            runs, meta_steps = [], []
            for seed in seeds:
                config = config_from_file(name, extra_flags, seed=seed)
                workdir = os.path.join(root, run_name, f"seed{seed}")
                path = os.path.join(workdir, evaluate.EVAL_FILE)
                start = time.perf_counter()
                if not os.path.exists(path):
                    train.train_and_evaluate(config, workdir)
                elif again:
                    reevaluate(workdir)
                with open(path) as f:
                    runs.append(json.load(f))
                meta_steps.append(max(r["step"] for r in metrics.read_metrics(workdir)))
                validation[f"{run_name} seed {seed}"] = validation_curve(workdir)
                print(f"{run_name} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
            out.update(quality_rows(run_name, seeds, runs, meta_steps, results_dir, trained_on,
                                    OBJECTIVES[config.meta_objective], extra_flags))
        if variants:  # named by its variants, so that another set of them draws its own
            names = "_".join(parse_variant(v)[0] for v in variants)
            plot_validation(os.path.join(results_dir,
                                         f"learned_optimizer_{name}_{names}_validation.png"),
                            name, validation)
    return out


def time_calls(fn, args, steps: int) -> float:
    """Seconds per call of `fn(*args)` (returns (carry, out)), the carry fed back, after two
    untimed calls: the first compiles for `args`, the second for the carry, whose shardings (a
    jitted step's outputs) can differ from the first arguments'."""
    carry, out = fn(*args)
    carry, out = fn(carry, *args[1:])
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(steps):
        carry, out = fn(carry, *args[1:])
    jax.block_until_ready((carry, out))
    return (time.perf_counter() - start) / steps


def speed(name: str, unroll_lengths, steps: int, estimators=train.ESTIMATORS) -> dict:
    """Per estimator and unroll length K: meta-steps/s, task-steps/s, the ratio to training the
    same meta-batch of tasks with plain Adam, and the compiled meta-step's temporary memory."""
    rows = {}
    for estimator, k in [(e, k) for e in estimators for k in unroll_lengths]:
        config = config_from_file(name, unroll_length=k, horizon=4 * k, estimator=estimator)
        family = train.make_family(config, "train")
        state = train.create_train_state(config, family, jax.random.PRNGKey(0))
        step = jax.jit(train.make_train_step(config, family))
        memory = step.lower(state, family.data).compile().memory_analysis()
        seconds = time_calls(step, (state, family.data), steps)

        adam = optax.adam(1e-3)
        trajectories = jax.vmap(lambda key: tasks.start(adam, family, key))(
            jax.random.split(jax.random.PRNGKey(0), config.meta_batch_size))
        adam_unroll = jax.jit(jax.vmap(lambda t, data: tasks.unroll(adam, family, t, k, 0, data),
                                       in_axes=(0, None)))
        adam_seconds = time_calls(adam_unroll, (trajectories, family.data), steps)
        task_steps = config.meta_batch_size * k
        rows[f"{estimator}/{k}"] = {
            "estimator": estimator, "unroll_length": k,
            "meta_steps_per_s": 1.0 / seconds, "task_steps_per_s": task_steps / seconds,
            "adam_task_steps_per_s": task_steps / adam_seconds,
            "ratio_meta_training_to_adam_training": adam_seconds / seconds,
            "temp_memory_mib": getattr(memory, "temp_size_in_bytes", 0) / 2**20}
        print(f"{estimator}, unroll {k}: {rows[f'{estimator}/{k}']}", flush=True)
    return {"config": name, "rows": rows}


def timed(fn, *args) -> float:
    """Seconds of one call of `fn(*args)` until its output is ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def step_cost(config: train.Config, family: tasks.TaskFamily) -> dict[str, float]:
    """XLA cost analysis of one optimizer step's share of the meta-gradient: the K = 1 meta-step's
    gradient, whose one-trip loop is counted exactly (XLA counts a loop body once), with the
    LSTM's steps not rematerialised: the FLOPs of the function, not of the way it is computed."""
    one = dataclasses.replace(config, unroll_length=1, horizon=1)
    state = train.create_train_state(one, family, jax.random.PRNGKey(0))

    def meta_loss(phi, trajectories, data):  # `train.truncated_meta_loss`, remat=False
        tx = lstm.lstm_optimizer(phi, one.output_scale, one.preprocessing, remat=False)
        return jnp.mean(jax.vmap(lambda t: tasks.scored_unroll(
            tx, family, t, 1, 0, data, one.second_order)[1])(trajectories))

    return roofline.compiled_cost(jax.jit(jax.grad(meta_loss)).lower(
        state.meta_params, state.trajectories, family.data).compile())


def meta_step_speed(name: str, batchings, rounds: int) -> dict:
    """The config's meta-step for each task batching, timed alternately (`rounds` rounds,
    medians), against the matmul peak and copy bandwidth measured in the same process: FLOPs per
    meta-step = K x `step_cost` (the same function whatever the batching), fraction of peak =
    achieved FLOP/s at the median time / the highest peak, and paired (the median over rounds of
    each round's fraction of the peak measured after it); plain Adam on the same tasks as in
    `speed`."""
    base = config_from_file(name)
    family = train.make_family(base, "train")
    cost = step_cost(base, family)
    k = base.unroll_length
    steps, memory = {}, {}
    for b in batchings:
        config = dataclasses.replace(base, task_batching=b)
        state = train.create_train_state(config, family, jax.random.PRNGKey(0))
        step = jax.jit(train.make_train_step(config, family))
        memory[b] = step.lower(state, family.data).compile().memory_analysis()
        jax.block_until_ready(step(state, family.data))
        steps[b] = (step, state)
    peaks = [roofline.matmul_peak_flops()]
    bandwidths, seconds = [roofline.copy_bandwidth()], {b: [] for b in batchings}
    for _ in range(rounds):
        for b in batchings:
            step, state = steps[b]
            seconds[b].append(timed(step, state, family.data))
        peaks.append(roofline.matmul_peak_flops())
        bandwidths.append(roofline.copy_bandwidth())
    peak, bandwidth = max(peaks), max(bandwidths)
    adam = optax.adam(1e-3)
    trajectories = jax.vmap(lambda key: tasks.start(adam, family, key))(
        jax.random.split(jax.random.PRNGKey(0), base.meta_batch_size))
    adam_unroll = jax.jit(jax.vmap(lambda t, data: tasks.unroll(adam, family, t, k, 0, data),
                                   in_axes=(0, None)))
    adam_seconds = time_calls(adam_unroll, (trajectories, family.data), 5)
    rows = {}
    for b in batchings:
        median = float(np.median(seconds[b]))
        task_steps = base.meta_batch_size * k
        rows[b] = {
            "task_batching": b, "unroll_length": k, "meta_batch_size": base.meta_batch_size,
            "seconds_per_meta_step": seconds[b], "meta_steps_per_s": 1.0 / median,
            "task_steps_per_s": task_steps / median,
            "adam_task_steps_per_s": task_steps / adam_seconds,
            "ratio_meta_training_to_adam_training": adam_seconds / median,
            "flops_per_meta_step": k * cost["flops"],
            "achieved_flops_per_s": k * cost["flops"] / median,
            "fraction_of_matmul_peak": k * cost["flops"] / median / peak,
            # each round against the peak measured right after it: robust to the slow spells of
            # a shared machine, which slow both
            "fraction_of_matmul_peak_paired": float(np.median(
                [k * cost["flops"] / t / p for t, p in zip(seconds[b], peaks[1:])])),
            "bytes_per_meta_step": k * cost["bytes"],
            "bytes_per_s_over_copy_bandwidth": k * cost["bytes"] / median / bandwidth,
            "temp_memory_mib": getattr(memory[b], "temp_size_in_bytes", 0) / 2**20,
            "speedup_over_first": float(np.median(np.array(seconds[batchings[0]])
                                                  / np.array(seconds[b])))}
        print(f"meta-step, {b}: {rows[b]}", flush=True)
    return {"config": name, "matmul_peak_flops_per_s": peak, "matmul_peaks": peaks,
            "copy_bytes_per_s": bandwidth, "copy_bandwidths": bandwidths,
            "machine": machine.machine_record(), "command": command(),
            "environment": cpu_settings.recorded(os.environ),
            "rows": rows}


def gradient_by_unroll(workdir: str, batches: int = 3) -> dict:
    """Mean over `batches` fresh meta-batches of the meta-gradient's global norm and of the
    meta-loss at each unroll position of a horizon (1 .. T / K), per meta-objective, at a run's
    saved meta-parameters and with its config: how much each part of the horizon weighs."""
    config = train.read_config(workdir)
    family = train.make_family(config, "train")
    meta_params, _ = lstm.load(os.path.join(workdir, train.META_PARAMS_FILE))
    out = {"workdir": workdir, "meta_batches": batches, "command": command()}
    for objective in train.META_OBJECTIVES:
        objective_config = dataclasses.replace(config, meta_objective=objective)
        gradient = jax.jit(lambda phi, traj, first, c=objective_config: (
            train.truncated_meta_gradient(c, family, phi, traj, first, family.data)))
        norms, losses = [], []
        for batch in range(batches):
            trajectories = train.fresh_trajectories(objective_config, family,
                                                    jax.random.PRNGKey(100 + batch))
            for position in range(config.horizon // config.unroll_length):
                grads, loss, trajectories = gradient(meta_params, trajectories,
                                                     position * config.unroll_length)
                norms.append(float(optax.tree.norm(grads)))
                losses.append(float(loss))
        shape = (batches, config.horizon // config.unroll_length)
        out[objective] = {"grad_norm": np.reshape(norms, shape).mean(0).tolist(),
                          "meta_loss": np.reshape(losses, shape).mean(0).tolist()}
        print(f"{objective}: {out[objective]}", flush=True)
    return out


def print_table(results: dict) -> None:
    print("\n| config | family | horizon | " + " | ".join(["lstm", "sgd", "nag", "rmsprop", "adam"])
          + " | LSTM/Adam | LSTM rank | seeds |")
    print("|---" * 11 + "|")
    for row in results.values():
        losses = " | ".join(f"{row['mean_final_loss'][o]['mean']:.3g}"
                            + (f" ± {row['mean_final_loss'][o]['sd']:.2g}" if o == "lstm" else "")
                            for o in ("lstm", "sgd", "nag", "rmsprop", "adam"))
        ratio, rank = row["ratio_lstm_to_adam"], row["lstm_rank"]
        print(f"| {row['config']} | {row['family']} | {row['horizon']} | {losses} | "
              f"{ratio['mean']:.3f} ± {ratio['sd']:.3f} | {rank['mean']:.1f} | {ratio['n']} |")


def main(argv):
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    configs, root, output = list(FLAGS.configs), FLAGS.root, FLAGS.output
    unrolls, speed_config = [int(k) for k in FLAGS.unroll_lengths], FLAGS.speed_config
    speed_steps, note = FLAGS.speed_steps, FLAGS.note
    gradient_params = FLAGS.gradient_by_unroll
    meta_step_config, rounds = FLAGS.meta_step_config, FLAGS.meta_step_rounds
    batchings = list(FLAGS.task_batchings)
    variants, add_seeds = list(FLAGS.variant), FLAGS.add_seeds
    results = quality(configs, seeds, root, os.path.dirname(output), FLAGS.reevaluate,
                      FLAGS.trained_on or devices(), variants)
    speed_results = speed(speed_config, unrolls, speed_steps) if unrolls else {}
    meta_step = meta_step_speed(meta_step_config, batchings, rounds) if meta_step_config else {}
    by_unroll = {}
    if gradient_params:
        by_unroll = gradient_by_unroll(gradient_params)
    previous = {}
    if os.path.exists(output):  # runs of other configs (or the speed table) stay in the file
        with open(output) as f:
            previous = json.load(f)
    if add_seeds:
        results = {key: rows_with_added_seeds(previous["quality"][key], row)
                   if key in previous.get("quality", {}) else row
                   for key, row in results.items()}
    replaced = {row["config"] for row in results.values()}
    results = {**{row_key(row): row for row in previous.get("quality", {}).values()
                  if row["config"] not in replaced}, **results}
    report = {"machine": {**machine.machine_record(), "devices": str(jax.devices())},
              "versions": {"python": platform.python_version(), "jax": jax.__version__,
                           "optax": optax.__version__},
              "flags": {"configs": configs, "seeds": seeds, "root": root,
                        "unroll_lengths": unrolls, "speed_config": speed_config},
              "notes": [*previous.get("notes", []), *([note] if note else [])],
              "quality": results, "speed": speed_results or previous.get("speed", {}),
              "meta_step_speed": meta_step or previous.get("meta_step_speed", {}),
              "gradient_by_unroll": by_unroll or previous.get("gradient_by_unroll", {})}
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    print_table(results)
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
