"""DCGAN train-step throughput: ours (JAX) against the TensorFlow DCGAN tutorial's step (Keras).

    python -m benchmarks.gan_speed              # writes benchmarks/results/gan_speed.json

Both steps: the tutorial's DCGAN (same layers, LeakyReLU 0.3, dropout 0.3, batch norm), the
non-saturating losses from one forward pass, Adam(1e-4, eps 1e-7) for both networks, batch 256.
The TensorFlow step is the tutorial's `train_step` under `tf.function` (`benchmarks/tf_dcgan.py`).

Each framework runs in each of its environments, one fresh process per (framework, environment),
for `--rounds` rounds (order reversed every other round): ours with and without the CPU settings
`launch/gan.py` gives its users (`common/cpu_settings.py`); TensorFlow plain, with oneDNN off, with
its thread pools sized to the cores, and with those CPU settings. The headline is ours-best /
TF-best, each framework in its own best environment; every other pairing is reported too. Only
ratios are meaningful on a shared machine, and only for the CPU they ran on: the JSON's `machine`
(`benchmarks/machine.py`) records its model name, family/model, core counts and ISA flags
(AVX-512, AMX), and the table prints them.

Also reported: the FLOPs of our compiled step (XLA's cost analysis) as a fraction of this machine's
fp32 matmul peak measured here, a per-op profile of our step (XLA ops from a JAX profiler trace),
and the peak resident memory of a training process at batch 64, 256 and 1024 (one subprocess
each).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

if __name__ == "__main__":
    from common import cpu_settings
    cpu_settings.apply_before_jax()

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import machine, tf_dcgan, xla_profile  # noqa: E402
from common import cpu_settings  # noqa: E402

flags.DEFINE_integer("batch_size", 256, "Batch size of both steps.")
flags.DEFINE_integer("steps", 5, "Steps per timed repeat.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per process (median over all rounds reported).")
flags.DEFINE_integer("child_batch", None, "Internal: measure peak RSS of training at this batch.")
flags.DEFINE_enum("child_framework", "ours", ["ours", "tf"],
                  "Internal: whose step --child_batch runs.")
flags.DEFINE_bool("only_memory", False,
                  "Measure only the peak RSS by batch and update it in an existing --output.")
flags.DEFINE_integer("rounds", 2, "Rounds over every (framework, environment) process.")
flags.DEFINE_enum("child_throughput", None, ["ours", "tf"],
                  "Internal: print this framework's images/s per repeat as JSON.")
flags.DEFINE_string("output", "benchmarks/results/gan_speed.json", "Where to write the JSON.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def real_batches(batch_size: int, count: int) -> list[np.ndarray]:
    from common import data
    try:
        images = data.load("fashion_mnist", "train").images
    except data.DataNotFoundError:
        images = data.load("digits", "train").images
    rng = np.random.default_rng(0)
    return [data.to_float(images[rng.choice(len(images), batch_size, replace=False)])
            for _ in range(count)]


# --------------------------------------------------------------------------------------------
# Ours


def our_step(batch_size: int):
    """(step(real) -> metrics, compiled executable) of our DCGAN with the tutorial's settings."""
    import jax
    from gan import train
    config = train.Config(model="dcgan", loss="non_saturating", schedule="simultaneous",
                          optimizer="adam", learning_rate=1e-4, adam_eps=1e-7,
                          batch_size=batch_size)
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    jitted = jax.jit(train.make_train_step(config), donate_argnums=(0,))
    holder = {"state": state}

    def step(real: np.ndarray):
        holder["state"], metrics = jitted(holder["state"], real[None])
        return metrics

    example = np.zeros((1, batch_size, 28, 28, 1), np.float32)
    compiled = jitted.lower(state, example).compile()
    return step, compiled


def time_ours(step, batches) -> float:
    import jax
    start = time.perf_counter()
    for real in batches:
        metrics = step(real)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# The TensorFlow tutorial (benchmarks/tf_dcgan.py)


def time_tf(step, batches) -> float:
    start = time.perf_counter()
    for real in batches:
        losses = step(real)
    float(losses[0])
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Measurements


def throughput(framework: str, batch_size: int, steps: int, repeats: int) -> list[float]:
    """Images/s of `repeats` timed runs of `steps` steps of one framework's step, in this process
    (its environment as started), after a warm-up of two compile/trace runs of 2 steps."""
    batches = real_batches(batch_size, steps)
    if framework == "ours":
        step, timer = our_step(batch_size)[0], time_ours
    else:
        import tensorflow as tf
        step, timer, batches = tf_dcgan.tutorial(batch_size)[0], time_tf, [tf.constant(b) for b in batches]
    for _ in range(2):
        timer(step, batches[:2])
    return [batch_size * steps / timer(step, batches) for _ in range(repeats)]


def environments(environ) -> dict[str, dict[str, dict[str, str]]]:
    """{framework: {label: environment}}: ours with and without the launcher's CPU settings;
    TensorFlow plain, with oneDNN off, with its thread pools sized to the cores, and with the
    launcher's settings (hugetlb malloc; the XLA flag does not reach TensorFlow's kernels)."""
    plain = cpu_settings.without_settings(environ)
    return {"ours": {"cpu settings": cpu_settings.with_settings(environ), "plain": plain},
            "tf": {"plain": plain,
                   "oneDNN off": {**plain, "TF_ENABLE_ONEDNN_OPTS": "0"},
                   "threads = cores": {**plain, "TF_NUM_INTRAOP_THREADS": str(os.cpu_count()),
                                       "TF_NUM_INTEROP_THREADS": "1"},
                   "cpu settings": cpu_settings.with_settings(environ)}}


ENV_KEYS = ("XLA_FLAGS", "GLIBC_TUNABLES", "TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS",
            "TF_NUM_INTEROP_THREADS")


def child_throughput(framework: str, env: dict[str, str], batch_size: int, steps: int,
                     repeats: int) -> list[float]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gan_speed",
                           f"--child_throughput={framework}", f"--batch_size={batch_size}",
                           f"--steps={steps}", f"--repeats={repeats}"],
                          capture_output=True, text=True, cwd=REPO,
                          env=dict(env, PYTHONPATH=REPO))
    if proc.returncode:
        raise RuntimeError(f"{framework} throughput child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fair_comparison(batch_size: int, steps: int, repeats: int, rounds: int) -> dict:
    """Every framework in each of its environments, one fresh process each, `rounds` times (the
    order reversed every other round); medians of images/s. Headline: the best of ours over the
    best of TensorFlow's, each framework in its own best environment."""
    envs = environments(os.environ)
    runs = [(fw, label) for fw, by_label in envs.items() for label in by_label]
    samples = {run: [] for run in runs}
    for r in range(rounds):
        for fw, label in (runs if r % 2 == 0 else runs[::-1]):
            samples[(fw, label)] += child_throughput(fw, envs[fw][label], batch_size, steps,
                                                     repeats)
            print(f"round {r + 1}/{rounds}: {fw:4s} {label:16s} "
                  f"{statistics.median(samples[(fw, label)]):7.1f} img/s", flush=True)
    table = {fw: {label: {"images_per_s": statistics.median(samples[(fw, label)]),
                          "images_per_s_all": samples[(fw, label)],
                          "env": {k: env[k] for k in ENV_KEYS if k in env}}
                  for label, env in by_label.items()} for fw, by_label in envs.items()}
    best = {fw: max(by_label, key=lambda label: by_label[label]["images_per_s"])
            for fw, by_label in table.items()}
    ours_best = table["ours"][best["ours"]]["images_per_s"]
    tf_best = table["tf"][best["tf"]]["images_per_s"]
    return {"throughput": table, "best_environment": best,
            "images_per_s_ours": ours_best, "images_per_s_tf": tf_best,
            "ratio": ours_best / tf_best,
            "ratios": {f"ours {a} / tf {b}": table["ours"][a]["images_per_s"]
                       / table["tf"][b]["images_per_s"]
                       for a in table["ours"] for b in table["tf"]},
            "ms_per_step_ours": 1e3 * batch_size / ours_best,
            "ms_per_step_tf": 1e3 * batch_size / tf_best}


def step_flops(batch_size: int) -> float:
    from benchmarks import roofline  # imports JAX, which the TensorFlow children never load
    _, compiled = our_step(batch_size)
    return roofline.compiled_cost(compiled)["flops"]


def op_profile(batch_size: int, steps: int = 3, top: int = 15) -> list[dict]:
    """Time per XLA op of our step from a JAX profiler trace, averaged over `steps`."""
    batches = real_batches(batch_size, steps)
    ours, compiled = our_step(batch_size)
    time_ours(ours, batches[:2])
    return xla_profile.op_profile(lambda: time_ours(ours, batches), compiled.as_text(), steps, top)


def peak_rss_of_this_process_mib() -> float:
    """VmHWM: the high-water mark of this process image's resident memory. Not getrusage's
    ru_maxrss, which Linux carries across fork and exec: a child started by a large parent
    reports at least the parent's size at the fork."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0


def peak_rss_mib(batch_size: int, framework: str = "ours") -> float:
    """Peak resident memory (MiB) of a process running 3 train steps (ours or TensorFlow's) at
    `batch_size`, data included."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gan_speed",
                           f"--child_batch={batch_size}", f"--child_framework={framework}"],
                          capture_output=True, text=True, check=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    return float(proc.stdout.strip().splitlines()[-1])


def peak_rss_by_batch() -> dict:
    return {"peak_rss_mib": {str(b): peak_rss_mib(b) for b in (64, 256, 1024)},
            "peak_rss_mib_tf": {str(b): peak_rss_mib(b, "tf") for b in (64, 256, 1024)},
            "peak_rss_note": "VmHWM of a fresh process that loads the data, builds the step and "
                             "runs 3 steps at the batch size"}


def environment(env) -> dict:
    """The two variables of the CPU settings and a label: 'cpu settings' when both are set."""
    values = cpu_settings.recorded(env)
    applied = (cpu_settings.XLA_FLAG in (values["XLA_FLAGS"] or "")
               and cpu_settings.GLIBC_TUNABLE in (values["GLIBC_TUNABLES"] or ""))
    return {**values, "label": "cpu settings" if applied else "plain"}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv):
    del argv
    if FLAGS.child_batch:
        if FLAGS.child_framework == "tf":
            time_tf(tf_dcgan.tutorial(FLAGS.child_batch)[0], real_batches(FLAGS.child_batch, 3))
        else:
            time_ours(our_step(FLAGS.child_batch)[0], real_batches(FLAGS.child_batch, 3))
        print(peak_rss_of_this_process_mib())
        return
    if FLAGS.only_memory:
        with open(FLAGS.output) as f:
            result = json.load(f)
        result.update(peak_rss_by_batch())
        print("peak RSS MiB by batch:", result["peak_rss_mib"], "TensorFlow:",
              result["peak_rss_mib_tf"])
        with open(FLAGS.output, "w") as f:
            json.dump(result, f, indent=2)
        return
    if FLAGS.child_throughput:
        print(json.dumps(throughput(FLAGS.child_throughput, FLAGS.batch_size, FLAGS.steps,
                                    FLAGS.repeats)))
        return
    import jax
    result = {"machine": machine.machine_record(),
              "versions": {"jax": jax.__version__, "python": platform.python_version()},
              "env": environment(os.environ),
              "flags": {k: FLAGS[k].value for k in ("batch_size", "steps", "repeats", "rounds")},
              "load_before": load()}
    print(f"Machine: {machine.describe(result['machine'])}", flush=True)
    result.update(fair_comparison(FLAGS.batch_size, FLAGS.steps, FLAGS.repeats, FLAGS.rounds))
    result["versions"]["tensorflow"] = tensorflow_version()
    result["load_after_compare"] = load()
    from benchmarks import roofline
    flops = step_flops(FLAGS.batch_size)
    peak = roofline.matmul_peak_flops()
    here = result["throughput"]["ours"][result["env"]["label"]]["images_per_s"]
    result.update({"flops_per_step": flops, "matmul_peak_flops": peak,
                   "achieved_flops": flops * here / FLAGS.batch_size,
                   "flops_fraction_of_peak": flops * here / FLAGS.batch_size / peak})
    result["op_profile"] = op_profile(FLAGS.batch_size)
    result.update(peak_rss_by_batch())
    result["load_after"] = load()
    print_table(result)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", FLAGS.output)


def tensorflow_version() -> str:
    proc = subprocess.run([sys.executable, "-c", "import tensorflow as tf; print(tf.__version__)"],
                          capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return proc.stdout.strip().splitlines()[-1]


def print_table(r: dict) -> None:
    print(f"\nMachine: {machine.describe(r['machine'])}")
    print(f"DCGAN train step, batch {r['flags']['batch_size']}, each framework in each of its "
          f"environments (load {r['load_before']} -> {r['load_after']})")
    for fw, by_label in r["throughput"].items():
        for label, x in by_label.items():
            mark = "  <- best" if r["best_environment"][fw] == label else ""
            print(f"  {'ours' if fw == 'ours' else 'TF':5s}{label:18s}{x['images_per_s']:9.1f} img/s{mark}")
    print(f"ours-best / TF-best = {r['ratio']:.2f}")
    for pairing, ratio in r["ratios"].items():
        print(f"  {pairing:44s}{ratio:6.2f}")
    print(f"FLOPs/step {r['flops_per_step'] / 1e9:.1f} G; achieved {r['achieved_flops'] / 1e9:.1f} "
          f"GFLOP/s; matmul peak {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s; fraction "
          f"{r['flops_fraction_of_peak']:.3f}")
    print("peak RSS MiB by batch:", r["peak_rss_mib"], "TensorFlow:", r.get("peak_rss_mib_tf"))
    print(f"\n{'op':28s}{'ms/step':>9s}{'share':>7s}  {'hlo':14s}{'shape':28s}source")
    for op in r["op_profile"]:
        print(f"{op['op'][:28]:28s}{op['ms_per_step']:9.1f}{op['fraction']:7.1%}  "
              f"{op['hlo'][:14]:14s}{op['shape'][:28]:28s}{op['source']}")


if __name__ == "__main__":
    app.run(main)
