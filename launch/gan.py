"""Trains a GAN: `python -m launch.gan --flagfile=launch/configs/demo.flags`.

Evaluates one: `python -m launch.gan --workdir=... --evaluate_only` (latest checkpoint; writes
`eval.json` next to the checkpoints: FID, FID on logits, Inception Score, Parzen log-likelihood).
"""

import json

if __name__ == "__main__":  # before JAX starts: XLA flags and glibc malloc (gan/cpu_settings.py)
    from gan import cpu_settings
    cpu_settings.apply_before_jax()

from absl import app, flags, logging  # noqa: E402

from gan import evaluate, losses, models, train  # noqa: E402
from launch import flags as launch_flags  # noqa: E402

flags.DEFINE_enum("model", None, list(models.MODELS), "Generator/discriminator pair.")
flags.DEFINE_enum("loss", None, list(losses.LOSSES), "GAN loss pair.")
flags.DEFINE_enum("schedule", None, list(train.SCHEDULES),
                  "sequential: Algorithm 1 (k D steps, then one G step); simultaneous: the "
                  "tutorial's one-forward-pass update of both (k = 1).")
flags.DEFINE_integer("d_steps", None, "k: discriminator steps per generator step.")
flags.DEFINE_enum("optimizer", None, list(train.OPTIMIZERS), "Optimizer of both networks.")
flags.DEFINE_float("learning_rate", None, "Learning rate of both networks.")
flags.DEFINE_float("adam_b1", None, "Adam beta1.")
flags.DEFINE_float("momentum", None, "SGD momentum at the start.")
flags.DEFINE_float("final_momentum", None, "SGD momentum after --momentum_saturate_steps.")
flags.DEFINE_integer("momentum_saturate_steps", None, "Steps over which momentum rises.")
flags.DEFINE_float("lr_decay", None, "Learning rate divided by this after every update.")
flags.DEFINE_float("min_learning_rate", None, "Floor of the decayed learning rate.")
flags.DEFINE_float("gp_weight", None, "Gradient-penalty weight (wasserstein_gp).")
flags.DEFINE_enum("noise", None, list(train.NOISE), "Noise distribution of z.")
flags.DEFINE_string("train_split", None,
                    "Split to train on: 'train', or a slice such as 'test[:8000]' (MNIST offline).")
flags.DEFINE_string("eval_split", None,
                    "Real images of FID and the Parzen test set: 'test', or e.g. 'test[8000:]'.")
flags.DEFINE_integer("num_epochs", None, "Epochs (ignored when --num_steps is given).")
flags.DEFINE_float("max_minutes", None,
                   "Stop at the first checkpoint after this many minutes (0: no limit); the same "
                   "command continues the run.")
flags.DEFINE_integer("sample_every", None, "Write a sample grid every this many steps.")
flags.DEFINE_integer("num_samples", None, "Images in the sample grid.")
flags.DEFINE_bool("evaluate_only", False,
                  "Evaluate the latest checkpoint of --workdir (writes eval.json) instead of "
                  "training.")
flags.DEFINE_integer("eval_every", None,
                     "Compute FID/IS/Parzen every this many steps into metrics.jsonl (0: never).")
flags.DEFINE_integer("eval_num_samples", None, "Generator samples per evaluation (10,000).")
flags.DEFINE_integer("eval_num_real", None, "Real test images per evaluation (10,000).")
flags.DEFINE_integer("eval_num_validation", None,
                     "Training images held out to choose the Parzen sigma (1,000).")
flags.DEFINE_bool("eval_parzen", None, "Include the Parzen-window log-likelihood.")
flags.DEFINE_string("classifier_dir", None,
                    "Cache of the FID classifiers (default ~/.cache/l2gl/classifiers).")
flags.DEFINE_integer("classifier_epochs", None, "Training epochs of the FID classifier.")
flags.DEFINE_integer("classifier_min_steps", None,
                     "The FID classifier trains at least this many steps (3,000), whatever the "
                     "epochs.")


def make_config() -> train.Config:
    """The run's config from the parsed flags."""
    return launch_flags.config_from_flags(train.Config)


def main(argv):
    del argv
    config = make_config()
    if launch_flags.FLAGS.evaluate_only:  # no setup(): it would overwrite the run's flags.txt
        try:
            result = evaluate.evaluate_workdir(launch_flags.FLAGS.workdir,
                                               train.eval_config(config))
        except FileNotFoundError as e:
            raise SystemExit(f"--evaluate_only: {e}") from e
        logging.info("Step %d of %s:\n%s", result["step"], launch_flags.FLAGS.workdir,
                     evaluate.describe(result))
        print(json.dumps(evaluate.flat_metrics(result)))
        return
    launch_flags.setup()
    train.train_and_evaluate(config, launch_flags.FLAGS.workdir, launch_flags.FLAGS.overwrite)


if __name__ == "__main__":
    app.run(main)
