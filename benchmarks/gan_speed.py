"""DCGAN train-step throughput: ours (JAX) against the TensorFlow DCGAN tutorial's step (Keras).

    python -m benchmarks.gan_speed              # writes benchmarks/results/gan_speed.json

Both steps: the tutorial's DCGAN (same layers, LeakyReLU 0.3, dropout 0.3, batch norm), the
non-saturating losses from one forward pass, Adam(1e-4, eps 1e-7) for both networks, batch 256.
The TensorFlow step is the tutorial's `train_step` under `tf.function`. Both run in this process on
the same Fashion-MNIST batches, alternating ours / theirs every repeat after a warm-up; each figure
is the median over repeats. Only the ratio is meaningful on a shared machine, and only for the CPU
it ran on: the JSON's `machine` (`benchmarks/machine.py`) records its model name, family/model,
core counts and ISA flags (AVX-512, AMX), and the table prints them.

Also reported: the FLOPs of our compiled step (XLA's cost analysis) as a fraction of this machine's
fp32 matmul peak measured here, a per-op profile of our step (XLA ops from a JAX profiler trace),
and the peak resident memory of a training process at batch 64, 256 and 1024 (one subprocess
each). The main process runs with the CPU settings `launch/gan.py` gives its users
(`gan/cpu_settings.py`: XLA_FLAGS routing convolutions away from YNNPACK, GLIBC_TUNABLES hugetlb
malloc; `GAN_CPU_SETTINGS=0` measures without them); `--env_compare` reruns the ours/TF comparison
in a subprocess in the other environment.
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
    from gan import cpu_settings
    cpu_settings.apply_before_jax()

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import machine, xla_profile  # noqa: E402
from gan import cpu_settings  # noqa: E402

flags.DEFINE_integer("batch_size", 256, "Batch size of both steps.")
flags.DEFINE_integer("steps", 5, "Steps per timed repeat.")
flags.DEFINE_integer("repeats", 5, "Alternating repeats (median reported).")
flags.DEFINE_integer("child_batch", None, "Internal: measure peak RSS of training at this batch.")
flags.DEFINE_enum("child_framework", "ours", ["ours", "tf"],
                  "Internal: whose step --child_batch runs.")
flags.DEFINE_bool("only_memory", False,
                  "Measure only the peak RSS by batch and update it in an existing --output.")
flags.DEFINE_bool("child_ratio", False, "Internal: print only the ours/TF figures as JSON.")
flags.DEFINE_bool("env_compare", True, "Also compare without/with the launcher's CPU settings.")
flags.DEFINE_integer("env_steps", 5, "Steps per repeat of the --env_compare subprocess.")
flags.DEFINE_integer("env_repeats", 3, "Repeats of the --env_compare subprocess.")
flags.DEFINE_string("output", "benchmarks/results/gan_speed.json", "Where to write the JSON.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE_DIM = 100


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
# The TensorFlow tutorial


def tf_step(batch_size: int):
    """The tutorial's models, losses, optimizers and `train_step`, verbatim up to the batch."""
    import tensorflow as tf
    from tensorflow.keras import layers

    def make_generator_model():
        model = tf.keras.Sequential([
            layers.Input((NOISE_DIM,)),
            layers.Dense(7 * 7 * 256, use_bias=False), layers.BatchNormalization(),
            layers.LeakyReLU(), layers.Reshape((7, 7, 256)),
            layers.Conv2DTranspose(128, (5, 5), strides=(1, 1), padding="same", use_bias=False),
            layers.BatchNormalization(), layers.LeakyReLU(),
            layers.Conv2DTranspose(64, (5, 5), strides=(2, 2), padding="same", use_bias=False),
            layers.BatchNormalization(), layers.LeakyReLU(),
            layers.Conv2DTranspose(1, (5, 5), strides=(2, 2), padding="same", use_bias=False,
                                   activation="tanh")])
        return model

    def make_discriminator_model():
        return tf.keras.Sequential([
            layers.Input((28, 28, 1)),
            layers.Conv2D(64, (5, 5), strides=(2, 2), padding="same"), layers.LeakyReLU(),
            layers.Dropout(0.3),
            layers.Conv2D(128, (5, 5), strides=(2, 2), padding="same"), layers.LeakyReLU(),
            layers.Dropout(0.3), layers.Flatten(), layers.Dense(1)])

    generator, discriminator = make_generator_model(), make_discriminator_model()
    cross_entropy = tf.keras.losses.BinaryCrossentropy(from_logits=True)
    generator_optimizer = tf.keras.optimizers.Adam(1e-4, epsilon=1e-7)
    discriminator_optimizer = tf.keras.optimizers.Adam(1e-4, epsilon=1e-7)

    def discriminator_loss(real_output, fake_output):
        return (cross_entropy(tf.ones_like(real_output), real_output)
                + cross_entropy(tf.zeros_like(fake_output), fake_output))

    def generator_loss(fake_output):
        return cross_entropy(tf.ones_like(fake_output), fake_output)

    @tf.function
    def train_step(images):
        noise = tf.random.normal([batch_size, NOISE_DIM])
        with tf.GradientTape() as gen_tape, tf.GradientTape() as disc_tape:
            generated_images = generator(noise, training=True)
            real_output = discriminator(images, training=True)
            fake_output = discriminator(generated_images, training=True)
            gen_loss = generator_loss(fake_output)
            disc_loss = discriminator_loss(real_output, fake_output)
        gradients_of_generator = gen_tape.gradient(gen_loss, generator.trainable_variables)
        gradients_of_discriminator = disc_tape.gradient(disc_loss,
                                                        discriminator.trainable_variables)
        generator_optimizer.apply_gradients(zip(gradients_of_generator,
                                                generator.trainable_variables))
        discriminator_optimizer.apply_gradients(zip(gradients_of_discriminator,
                                                    discriminator.trainable_variables))
        return gen_loss, disc_loss

    return train_step


def time_tf(step, batches) -> float:
    start = time.perf_counter()
    for real in batches:
        losses = step(real)
    float(losses[0])
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Measurements


def compare(batch_size: int, steps: int, repeats: int) -> dict:
    """Alternating repeats of ours and TF on the same batches; medians of images/s."""
    import tensorflow as tf
    batches = real_batches(batch_size, steps)
    ours, _ = our_step(batch_size)
    theirs = tf_step(batch_size)
    tf_batches = [tf.constant(b) for b in batches]
    for _ in range(2):  # warm-up: compile / trace, first-touch of buffers
        time_ours(ours, batches[:2])
        time_tf(theirs, tf_batches[:2])
    ours_s, tf_s = [], []
    for _ in range(repeats):
        ours_s.append(time_ours(ours, batches))
        tf_s.append(time_tf(theirs, tf_batches))
    ours_ips = [batch_size * steps / s for s in ours_s]
    tf_ips = [batch_size * steps / s for s in tf_s]
    return {"images_per_s_ours": statistics.median(ours_ips),
            "images_per_s_tf": statistics.median(tf_ips),
            "ratio": statistics.median([a / b for a, b in zip(ours_ips, tf_ips)]),
            "ms_per_step_ours": 1e3 * statistics.median(ours_s) / steps,
            "ms_per_step_tf": 1e3 * statistics.median(tf_s) / steps,
            "images_per_s_ours_all": ours_ips, "images_per_s_tf_all": tf_ips,
            "tensorflow": tf.__version__}


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n x n matmul (jitted, XLA CPU)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def step_flops(batch_size: int) -> float:
    _, compiled = our_step(batch_size)
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


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
                           f"--child_batch={batch_size}", f"--child_framework={framework}",
                           "--env_compare=false"],
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
    values = {k: env.get(k) for k in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    applied = (cpu_settings.XLA_FLAG in (values["XLA_FLAGS"] or "")
               and cpu_settings.GLIBC_TUNABLE in (values["GLIBC_TUNABLES"] or ""))
    return {**values, "label": "cpu settings" if applied else "plain"}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv):
    del argv
    if FLAGS.child_batch:
        if FLAGS.child_framework == "tf":
            time_tf(tf_step(FLAGS.child_batch), real_batches(FLAGS.child_batch, 3))
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
    if FLAGS.child_ratio:
        steps, repeats = FLAGS.env_steps, FLAGS.env_repeats
        print(json.dumps({"steps": steps, "repeats": repeats,
                          **compare(FLAGS.batch_size, steps, repeats)}))
        return
    import jax
    result = {"machine": machine.machine_record(),
              "versions": {"jax": jax.__version__, "python": platform.python_version()},
              "env": environment(os.environ),
              "flags": {k: FLAGS[k].value for k in ("batch_size", "steps", "repeats")},
              "load_before": load()}
    result.update(compare(FLAGS.batch_size, FLAGS.steps, FLAGS.repeats))
    result["load_after_compare"] = load()
    flops = step_flops(FLAGS.batch_size)
    peak = matmul_peak_flops()
    result.update({"flops_per_step": flops, "matmul_peak_flops": peak,
                   "achieved_flops": flops * result["images_per_s_ours"] / FLAGS.batch_size,
                   "flops_fraction_of_peak":
                       flops * result["images_per_s_ours"] / FLAGS.batch_size / peak})
    result["op_profile"] = op_profile(FLAGS.batch_size)
    result.update(peak_rss_by_batch())
    if FLAGS.env_compare:
        other = (cpu_settings.with_settings if result["env"]["label"] == "plain"
                 else cpu_settings.without_settings)(os.environ)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gan_speed", "--child_ratio",
                               f"--batch_size={FLAGS.batch_size}",
                               f"--env_steps={FLAGS.env_steps}",
                               f"--env_repeats={FLAGS.env_repeats}"], capture_output=True, text=True,
                              cwd=REPO, env=dict(other, PYTHONPATH=REPO), check=True)
        result["other_env"] = {**environment(other),
                               **json.loads(proc.stdout.strip().splitlines()[-1])}
    result["load_after"] = load()
    print_table(result)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", FLAGS.output)


def print_table(r: dict) -> None:
    print(f"\nMachine: {machine.describe(r['machine'])}")
    print(f"DCGAN train step, batch {r['flags']['batch_size']} (load {r['load_before']} -> "
          f"{r['load_after']})")
    print(f"{'':28s}{'ours img/s':>12s}{'TF img/s':>12s}{'ratio':>8s}")
    rows = [(r["env"]["label"], r)]
    if "other_env" in r:
        rows.append((r["other_env"]["label"], r["other_env"]))
    for label, x in rows:
        print(f"{label:28s}{x['images_per_s_ours']:12.1f}{x['images_per_s_tf']:12.1f}"
              f"{x['ratio']:8.2f}")
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
