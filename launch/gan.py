"""Trains a GAN: `python -m launch.gan --flagfile=launch/configs/demo.flags --workdir=...`.

Evaluates one: `python -m launch.gan --workdir=... --evaluate_only` (latest checkpoint; writes
`eval.json` next to the checkpoints: FID, FID on logits, Inception Score, Parzen log-likelihood).
"""

import json

if __name__ == "__main__":  # before JAX starts: XLA flags and glibc malloc (common/cpu_settings.py)
    from common import cpu_settings
    cpu_settings.apply_before_jax()

from absl import app, flags, logging  # noqa: E402

from gan import evaluate, train  # noqa: E402
from launch import flags as launch_flags  # noqa: E402

launch_flags.define_config_flags(train.Config)
flags.DEFINE_bool("evaluate_only", False,
                  "Evaluate the latest checkpoint of --workdir (writes eval.json) with the --eval_* "
                  "flags and --seed, instead of training.")
FLAGS = flags.FLAGS


def make_config() -> train.Config:
    """The run's config from the parsed flags."""
    return launch_flags.config_from_flags(train.Config)


def evaluate_only(config: train.Config) -> None:
    """Evaluates the run in --workdir; leaves its flags.txt alone (no setup())."""
    try:
        result = train.evaluate_workdir(FLAGS.workdir, config.eval, config.seed)
    except FileNotFoundError as e:
        raise SystemExit(f"--evaluate_only: {e}") from e
    logging.info("Step %d of %s:\n%s", result["step"], FLAGS.workdir, evaluate.describe(result))
    print(json.dumps(evaluate.flat_metrics(result)))


def main(argv):
    del argv
    if FLAGS.evaluate_only:
        evaluate_only(make_config())
        return
    launch_flags.run(train.train_and_evaluate, make_config())


if __name__ == "__main__":
    app.run(main)
