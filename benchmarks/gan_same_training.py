"""Our DCGAN and the TensorFlow tutorial's, trained the same way: FID after every epoch.

    python -m benchmarks.gan_same_training --workdir=runs/gan_same_training

Both train the tutorial's DCGAN on Fashion-MNIST with its settings (Adam 1e-4 / eps 1e-7 for both
networks, batch 256, noise 100, the non-saturating losses from one forward pass) on the same
batches: batch s of seed k is `common.data.batch_indices(60000, 256, k, s)` for both frameworks.
Ours is the launcher's run (`gan.train.train_and_evaluate`, the settings of
`launch/configs/dcgan_fashion_mnist.flags`); TensorFlow's is the tutorial's `train_step`
(`benchmarks/tf_dcgan.py`) with `tf.random.set_seed(k)`. After every epoch each generator
(running batch-norm averages) draws `--eval_num_samples` images, scored by the same in-repo
classifier against the same test images (`gan.evaluate.evaluate_images`, Parzen off).

Writes benchmarks/results/gan_same_training.json (FID / FD-on-logits / IS per epoch for every
run, whether each of our epochs lies inside TensorFlow's range over its seeds) and
gan_same_training_fid.png. A finished run is kept in the JSON and skipped by a rerun; our runs
resume from their checkpoints in --workdir, an interrupted TensorFlow run starts again.
"""

from __future__ import annotations

import json
import os
import platform
import time

if __name__ == "__main__":  # the launcher's CPU settings (common/cpu_settings.py), before JAX starts
    from common import cpu_settings
    cpu_settings.apply_before_jax()

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from benchmarks import machine, tf_dcgan  # noqa: E402
from benchmarks.stats import mean_sd, welch_two_sided  # noqa: E402
from common import data, metrics  # noqa: E402
from gan import evaluate, train  # noqa: E402

flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the runs (each framework runs every seed).")
flags.DEFINE_integer("epochs", 5, "Epochs of every run.")
flags.DEFINE_list("frameworks", ["ours", "tf"], "Which frameworks to run.")
flags.DEFINE_integer("eval_num_samples", 10_000, "Generated images per evaluation.")
flags.DEFINE_string("data_dir", None, "Directory of Fashion-MNIST's IDX files.")
flags.DEFINE_string("workdir", "/tmp/gan_same_training", "Where our runs live.")
flags.DEFINE_string("output", "benchmarks/results/gan_same_training.json",
                    "Where to write the JSON (its PNG goes next to it).")
FLAGS = flags.FLAGS

DATASET, BATCH_SIZE = "fashion_mnist", 256


def eval_config(every: int) -> evaluate.EvalConfig:
    return evaluate.EvalConfig(every=every, num_samples=FLAGS.eval_num_samples, parzen=False)


def ours(seed: int, epochs: int, epoch_steps: int) -> list[dict]:
    """Our launcher's run with the tutorial's settings; FID etc. per epoch."""
    config = train.Config(model="dcgan", dataset=DATASET, data_dir=FLAGS.data_dir,
                          loss="non_saturating", schedule="simultaneous", optimizer="adam",
                          learning_rate=1e-4, adam_eps=1e-7, batch_size=BATCH_SIZE,
                          num_epochs=epochs, seed=seed, log_every=50,
                          checkpoint_every=epoch_steps, sample_every=epoch_steps,
                          eval=eval_config(epoch_steps))
    workdir = os.path.join(FLAGS.workdir, f"ours_seed{seed}")
    train.train_and_evaluate(config, workdir)
    return [{"epoch": r["step"] // epoch_steps, **without_prefix(r)}
            for r in metrics.read_metrics(workdir) if "eval_fid" in r]


def without_prefix(row: dict) -> dict:
    """The `eval_*` metrics of a metrics row, named without the prefix."""
    return {k[len("eval_"):]: v for k, v in row.items() if k.startswith("eval_")}


def tensorflow(seed: int, epochs: int, epoch_steps: int, train_images: np.ndarray) -> list[dict]:
    """The tutorial's step on our batches; its generator scored after every epoch."""
    import tensorflow as tf
    train_step, generator = tf_dcgan.tutorial(BATCH_SIZE, seed)
    noise = np.random.default_rng([seed, 0x9A9]).standard_normal(
        (FLAGS.eval_num_samples, tf_dcgan.NOISE_DIM)).astype(np.float32)
    rows = []
    for epoch in range(1, epochs + 1):
        start = time.time()
        for step in range((epoch - 1) * epoch_steps, epoch * epoch_steps):
            batch = train_images[data.batch_indices(len(train_images), BATCH_SIZE, seed, step)]
            losses = train_step(tf.constant(batch))
        logging.info("TensorFlow seed %d epoch %d: %.0f s, losses G %.3f D %.3f", seed, epoch,
                     time.time() - start, float(losses[0]), float(losses[1]))
        samples = np.concatenate([generator(noise[i:i + 500], training=False).numpy()
                                  for i in range(0, len(noise), 500)])
        result = evaluate.evaluate_images(evaluate.to_unit_range(samples, (-1.0, 1.0)), DATASET,
                                          FLAGS.data_dir, eval_config(epoch_steps), "train",
                                          "test", seed)
        rows.append({"epoch": epoch, **without_prefix(evaluate.flat_metrics(result))})
        logging.info("TensorFlow seed %d epoch %d: FID %.2f", seed, epoch, rows[-1]["fid"])
    return rows


def inside_tf_range(result: dict) -> list[dict]:
    """Per epoch: TensorFlow's FID range over its seeds, whether each of our runs is in it, both
    frameworks' mean ± sd, and Welch's two-sided test of equal means."""
    tf_runs = [r for r in result["runs"].values() if r["framework"] == "tf"]
    our_runs = {k: r for k, r in result["runs"].items() if r["framework"] == "ours"}
    out = []
    for epoch in range(1, FLAGS.epochs + 1):
        tf_fid = [row["fid"] for r in tf_runs for row in r["per_epoch"] if row["epoch"] == epoch]
        ours_fid = {k: row["fid"] for k, r in our_runs.items() for row in r["per_epoch"]
                    if row["epoch"] == epoch}
        if tf_fid and ours_fid:
            lo, hi = min(tf_fid), max(tf_fid)
            ours_values = list(ours_fid.values())
            out.append({"epoch": epoch, "tf_min": lo, "tf_max": hi, "ours": ours_fid,
                        "ours_inside": {k: lo <= v <= hi for k, v in ours_fid.items()},
                        "ours_mean_minus_tf_mean": float(np.mean(ours_values) - np.mean(tf_fid)),
                        "ours_fid": mean_sd(ours_values), "tf_fid": mean_sd(tf_fid),
                        "welch_p_two_sided": welch_two_sided(ours_values, tf_fid)})
    return out


def main(argv):
    del argv
    train_images = data.to_float(data.load(DATASET, "train", FLAGS.data_dir).images)
    epoch_steps = len(train_images) // BATCH_SIZE
    result = {"runs": {}}
    if os.path.exists(FLAGS.output):
        with open(FLAGS.output) as f:
            result = json.load(f)
    result.update({"machine": machine.machine_record(), "python": platform.python_version(),
                   "flags": {k: FLAGS[k].value for k in ("seeds", "epochs", "eval_num_samples")},
                   "steps_per_epoch": epoch_steps})
    for seed in map(int, FLAGS.seeds):
        for framework in FLAGS.frameworks:
            name = f"{framework}_seed{seed}"
            done = result["runs"].get(name, {}).get("per_epoch", [])
            if len(done) >= FLAGS.epochs:
                continue
            start = time.time()
            rows = (ours(seed, FLAGS.epochs, epoch_steps) if framework == "ours"
                    else tensorflow(seed, FLAGS.epochs, epoch_steps, train_images))
            result["runs"][name] = {"framework": framework, "seed": seed, "per_epoch": rows,
                                    "seconds": time.time() - start,
                                    "cpu_model": result["machine"].get("cpu_model")}
            save(result)
    import jax
    import tensorflow as tf
    result["versions"] = {"jax": jax.__version__, "tensorflow": tf.__version__}
    save(result)
    for row in result["comparison"]:
        print(f"epoch {row['epoch']}: TF FID {row['tf_min']:.2f}..{row['tf_max']:.2f}, ours "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["ours"].items()))


def save(result: dict) -> None:
    """Writes the JSON, with the comparison of the runs so far, and the FID curves' PNG."""
    result["comparison"] = inside_tf_range(result)
    metrics.write_json(FLAGS.output, result)
    plot_fid(os.path.splitext(FLAGS.output)[0] + "_fid.png", result["runs"])


def plot_fid(path: str, runs: dict) -> str:
    """FID per epoch: each run thin, each framework's mean over its seeds thick, and the range of
    TensorFlow's seeds shaded."""
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    for framework, color, style in (("tf", "tab:orange", "--"), ("ours", "tab:blue", "-")):
        own = [run["per_epoch"] for run in runs.values() if run["framework"] == framework]
        if not own:
            continue
        epochs = [row["epoch"] for row in own[0]]
        fid = np.array([[row["fid"] for row in rows[:len(epochs)]] for rows in own])
        for curve in fid:
            ax.plot(epochs, curve, style, color=color, alpha=0.35, lw=1)
        ax.plot(epochs, fid.mean(0), style, color=color, lw=2.5,
                label=f"{'TensorFlow tutorial' if framework == 'tf' else 'ours'}: mean of "
                      f"{len(own)} seeds (thin: each seed)")
        if framework == "tf":
            ax.fill_between(epochs, fid.min(0), fid.max(0), color=color, alpha=0.15,
                            label="TensorFlow's range over seeds")
    ax.set(xlabel="epoch", ylabel="FID (in-repo classifier)",
           title="DCGAN on Fashion-MNIST, same batches: ours vs the TF tutorial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


if __name__ == "__main__":
    app.run(main)
