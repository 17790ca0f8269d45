"""GAN sample quality: the metrics validated on real data, DCGAN FID/IS per epoch, and the
minimax vs non-saturating generator loss of Goodfellow et al.'s MLP GAN early in training.

    python -m benchmarks.gan_quality --dcgan_epochs=1 --mlp_steps=300

Writes benchmarks/results/gan_quality.json and PNGs next to it (FID vs epoch, the final DCGAN
sample grid, D(G(z)) and the generator's gradient norm for both losses). Runs live in
--workdir (one sub-directory each) and resume when rerun.

1. Validation on real data (no GAN): FID / FD-on-logits / IS of real training images and of
   uniform noise against the test set, and the Parzen log-likelihood with real training images
   standing in for generator samples -- the number a perfect memoriser gets.
2. DCGAN with the TensorFlow tutorial's settings (launch/configs/dcgan_fashion_mnist.flags),
   evaluated after every epoch (`eval_every` = one epoch of steps).
3. The MLP GAN (launch/configs/goodfellow_mlp_mnist.flags' model and optimizer) with the minimax
   and the non-saturating generator loss, same seed: D(G(z)) and ||grad_G|| from metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from absl import app, flags

from common import data, images, metrics
from gan import classifier as classifier_lib
from gan import evaluate, train

flags.DEFINE_string("dataset", "fashion_mnist", "Dataset of every part.")
flags.DEFINE_string("workdir", "/tmp/gan_quality", "Where the runs live.")
flags.DEFINE_integer("dcgan_epochs", 1, "DCGAN epochs (0: skip).")
flags.DEFINE_integer("mlp_steps", 300, "Steps of each MLP GAN run (0: skip).")
flags.DEFINE_integer("eval_num_samples", 10_000, "Generated images per evaluation.")
flags.DEFINE_bool("validation", True, "Run the real-data validation part.")
flags.DEFINE_string("output", "benchmarks/results/gan_quality.json", "Where to write the JSON.")
FLAGS = flags.FLAGS


def validation_on_real_data(dataset: str, eval_config: evaluate.EvalConfig) -> dict:
    """The metrics on real images and on noise, where the right answers are known."""
    clf = classifier_lib.load_or_train(classifier_lib.ClassifierConfig(
        dataset=dataset, epochs=eval_config.classifier_epochs), eval_config.classifier_dir)
    test, validation = evaluate.reference_images(dataset, None, eval_config)
    train_images = data.load(dataset, "train").images
    pick = np.random.default_rng(1).permutation(len(train_images))
    held_out = set(np.random.default_rng(eval_config.seed).permutation(len(train_images))[
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
    steps_per_epoch = len(data.load(FLAGS.dataset, "train").images) // 256
    config = train.Config(model="dcgan", dataset=FLAGS.dataset, loss="non_saturating",
                          schedule="simultaneous", optimizer="adam", learning_rate=1e-4,
                          batch_size=256, num_epochs=epochs, log_every=50,
                          checkpoint_every=steps_per_epoch, sample_every=steps_per_epoch,
                          eval_every=steps_per_epoch, eval_num_samples=eval_config.num_samples,
                          eval_parzen=True)
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
        config = train.Config(model="mlp", dataset=FLAGS.dataset, loss=loss,
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
    eval_config = evaluate.EvalConfig(num_samples=FLAGS.eval_num_samples)
    result = {"dataset": FLAGS.dataset, "load_start": os.getloadavg(),
              "flags": {k: FLAGS[k].value for k in ("dcgan_epochs", "mlp_steps",
                                                    "eval_num_samples")}}
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
            images.save_curves(os.path.join(results_dir, f"gan_quality_mlp_{key}.png"),
                               {loss: (c["step"], c[key]) for loss, c in curves.items()},
                               xlabel="step", ylabel=label, logy=key == "g_grad_norm",
                               title=f"MLP GAN on {FLAGS.dataset}: {label}")
        save(result)
    if FLAGS.dcgan_epochs:
        run = os.path.join(FLAGS.workdir, "dcgan")
        result["dcgan"] = dcgan_per_epoch(run, FLAGS.dcgan_epochs, eval_config)
        epochs = [r["epoch"] for r in result["dcgan"]["per_epoch"]]
        images.save_curves(os.path.join(results_dir, "gan_quality_dcgan_fid.png"),
                           {"FID (classifier penultimate)":
                            (epochs, [r["eval_fid"] for r in result["dcgan"]["per_epoch"]])},
                           xlabel="epoch", ylabel="FID", title=f"DCGAN on {FLAGS.dataset}")
        if os.path.exists(os.path.join(run, "samples.png")):
            import shutil
            shutil.copy(os.path.join(run, "samples.png"),
                        os.path.join(results_dir, "gan_quality_dcgan_samples.png"))
    result["load_end"] = os.getloadavg()
    save(result)


def save(result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
