"""GAN sample quality: the metrics validated on real data, DCGAN FID/IS per epoch, and the
minimax vs non-saturating generator loss of Goodfellow et al.'s MLP GAN early in training.

    python -m benchmarks.gan_quality --dcgan_minutes=60 --mlp_steps=300
    python -m benchmarks.gan_quality --dataset=mnist --data_dir=../shared/data/mnist \
        --train_split='test[:8000]' --eval_split='test[8000:]' --eval_every_epochs=10 \
        --dcgan_minutes=30 --output=benchmarks/results/gan_quality_mnist.json

The second line is MNIST as it is available offline: its 10,000 test digits, the first 8,000
training the GAN (and the FID classifier), the last 2,000 the reference of FID and the Parzen test
set.

Writes benchmarks/results/gan_quality.json and PNGs next to it (FID vs epoch, the final DCGAN
sample grid, D(G(z)) and the generator's gradient norm for both losses). Runs live in
--workdir (one sub-directory each) and resume when rerun.

1. Validation on real data (no GAN): FID / FD-on-logits / IS of real training images and of
   uniform noise against the test set, and the Parzen log-likelihood with real training images
   standing in for generator samples -- the number a perfect memoriser gets.
2. DCGAN with the TensorFlow tutorial's settings (launch/configs/dcgan_fashion_mnist.flags),
   evaluated every `--eval_every_epochs` epochs, for `--dcgan_minutes` (it stops at the first
   evaluation after that; rerunning the command continues the run).
3. The MLP GAN (launch/configs/goodfellow_mlp_mnist.flags' model and optimizer) with the minimax
   and the non-saturating generator loss, same seed: D(G(z)) and ||grad_G|| from metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

if __name__ == "__main__":  # the launcher's CPU settings (common/cpu_settings.py), before JAX starts
    from common import cpu_settings
    cpu_settings.apply_before_jax()

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from common import data, images, metrics  # noqa: E402
from gan import classifier as classifier_lib  # noqa: E402
from gan import evaluate, train  # noqa: E402

flags.DEFINE_string("dataset", "fashion_mnist", "Dataset of every part.")
flags.DEFINE_string("workdir", "/tmp/gan_quality", "Where the runs live.")
flags.DEFINE_string("data_dir", None, "Directory of the dataset's IDX files.")
flags.DEFINE_string("train_split", "train", "Split the GANs train on, e.g. 'test[:8000]'.")
flags.DEFINE_string("eval_split", "test", "Split of the real images FID compares with.")
flags.DEFINE_integer("dcgan_epochs", 1000, "DCGAN epochs at most (0: skip the DCGAN).")
flags.DEFINE_float("dcgan_minutes", 60, "Stop the DCGAN at the first epoch after this long.")
flags.DEFINE_integer("eval_every_epochs", 1, "Evaluate the DCGAN every this many epochs.")
flags.DEFINE_integer("mlp_steps", 300, "Steps of each MLP GAN run (0: skip).")
flags.DEFINE_integer("eval_num_samples", 10_000, "Generated images per evaluation.")
flags.DEFINE_bool("validation", True, "Run the real-data validation part.")
flags.DEFINE_string("output", "benchmarks/results/gan_quality.json", "Where to write the JSON.")
FLAGS = flags.FLAGS


def validation_on_real_data(dataset: str, eval_config: evaluate.EvalConfig) -> dict:
    """The metrics on real images and on noise, where the right answers are known."""
    clf = classifier_lib.load_or_train(classifier_lib.ClassifierConfig(
        dataset=dataset, data_dir=FLAGS.data_dir, epochs=eval_config.classifier_epochs,
        min_steps=eval_config.classifier_min_steps), eval_config.classifier_dir)
    seed = train.Config().seed  # the runs' seed, which draws the Parzen validation images
    test, validation = evaluate.reference_images(dataset, FLAGS.data_dir, eval_config,
                                                 FLAGS.train_split, FLAGS.eval_split, seed)
    train_images = data.load(dataset, FLAGS.train_split, FLAGS.data_dir).images
    pick = np.random.default_rng(1).permutation(len(train_images))
    held_out = set(np.random.default_rng(seed).permutation(len(train_images))[
        :eval_config.num_validation].tolist())
    pick = np.array([i for i in pick if i not in held_out])[:eval_config.num_samples]
    real = train_images[pick].astype(np.float32) / 255.0
    noise = np.random.default_rng(2).uniform(0, 1, real.shape).astype(np.float32)
    out = {"classifier": clf.info}
    for name, samples in (("real_train_vs_test", real), ("uniform_noise_vs_test", noise)):
        out[name] = evaluate.classifier_metrics(clf, samples * 2 - 1, test * 2 - 1)
    out["parzen_real_train_as_samples"] = evaluate.parzen_protocol(real, validation, test)
    return out


def dcgan_per_epoch(workdir: str, epochs: int, eval_config: evaluate.EvalConfig) -> dict:
    """The tutorial's DCGAN (launch/configs/dcgan_fashion_mnist.flags) until `--dcgan_minutes`."""
    steps_per_epoch = len(data.load(FLAGS.dataset, FLAGS.train_split, FLAGS.data_dir)) // 256
    every = steps_per_epoch * FLAGS.eval_every_epochs
    config = train.Config(model="dcgan", dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                          train_split=FLAGS.train_split, eval_split=FLAGS.eval_split,
                          loss="non_saturating", schedule="simultaneous", optimizer="adam",
                          learning_rate=1e-4, batch_size=256, num_epochs=epochs, log_every=50,
                          max_minutes=FLAGS.dcgan_minutes, checkpoint_every=every,
                          sample_every=every,
                          eval=dataclasses.replace(eval_config, every=every, parzen=True))
    start = time.time()
    train.train_and_evaluate(config, workdir)
    rows = [r for r in metrics.read_metrics(workdir) if "eval_fid" in r]
    per_epoch = [{"epoch": r["step"] // steps_per_epoch, "step": r["step"],
                  **{k: v for k, v in r.items() if k.startswith("eval_")}} for r in rows]
    return {"config": dataclasses.asdict(config), "per_epoch": per_epoch,
            "seconds": time.time() - start, "samples_png": os.path.join(workdir, "samples.png")}


def mlp_losses(workdir: str, steps: int) -> dict:
    out = {}
    for loss in ("minimax", "non_saturating"):
        config = train.Config(model="mlp", dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                              train_split=FLAGS.train_split, eval_split=FLAGS.eval_split, loss=loss,
                              schedule="sequential", optimizer="sgd_momentum", learning_rate=0.1,
                              momentum=0.5, batch_size=100, num_steps=steps, log_every=1,
                              checkpoint_every=steps, sample_every=steps)
        run = os.path.join(workdir, f"mlp_{loss}")
        train.train_and_evaluate(config, run)
        rows = metrics.read_metrics(run)
        out[loss] = {k: [r[k] for r in rows] for k in ("step", "d_fake", "g_grad_norm", "g_loss")}
    return out


def main(argv):
    del argv
    results_dir = os.path.dirname(os.path.abspath(FLAGS.output))
    stem = os.path.splitext(os.path.basename(FLAGS.output))[0]  # of the PNGs written next to it
    eval_config = evaluate.EvalConfig(num_samples=FLAGS.eval_num_samples)
    result = {"dataset": FLAGS.dataset, "load_start": os.getloadavg(),
              "flags": {k: FLAGS[k].value for k in (
                  "data_dir", "train_split", "eval_split", "dcgan_epochs", "dcgan_minutes",
                  "eval_every_epochs", "mlp_steps", "eval_num_samples")}}
    if os.path.exists(FLAGS.output):
        with open(FLAGS.output) as f:
            result = {**json.load(f), **result}
    if FLAGS.validation:
        result["validation_on_real_data"] = validation_on_real_data(FLAGS.dataset, eval_config)
        save(result)
    if FLAGS.mlp_steps:
        curves = mlp_losses(FLAGS.workdir, FLAGS.mlp_steps)
        result["mlp_minimax_vs_non_saturating"] = curves
        for key, label in (("d_fake", "D(G(z))"), ("g_grad_norm", "||grad_G||")):
            images.save_curves(os.path.join(results_dir, f"{stem}_mlp_{key}.png"),
                               {loss: (c["step"], c[key]) for loss, c in curves.items()},
                               xlabel="step", ylabel=label, logy=key == "g_grad_norm",
                               title=f"MLP GAN on {FLAGS.dataset}: {label}")
        save(result)
    if FLAGS.dcgan_epochs:
        run = os.path.join(FLAGS.workdir, "dcgan")
        result["dcgan"] = dcgan_per_epoch(run, FLAGS.dcgan_epochs, eval_config)
        epochs = [r["epoch"] for r in result["dcgan"]["per_epoch"]]
        images.save_curves(os.path.join(results_dir, f"{stem}_dcgan_fid.png"),
                           {label: (epochs, [r[key] for r in result["dcgan"]["per_epoch"]])
                            for key, label in (("eval_fid", "FID (classifier penultimate)"),
                                               ("eval_fid_logits", "FID (classifier logits)"))},
                           xlabel="epoch", ylabel="FID", title=f"DCGAN on {FLAGS.dataset}")
        if os.path.exists(os.path.join(run, "samples.png")):
            shutil.copy(os.path.join(run, "samples.png"),
                        os.path.join(results_dir, f"{stem}_dcgan_samples.png"))
    result["load_end"] = os.getloadavg()
    save(result)


def save(result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
