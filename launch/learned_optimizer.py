"""Meta-trains the LSTM optimizer and evaluates it against tuned baselines:
`python -m launch.learned_optimizer --flagfile=launch/configs/lstm_quadratic.flags --workdir=...`.
"""

if __name__ == "__main__":  # before JAX starts: XLA flags and glibc malloc (common/cpu_settings.py)
    from common import cpu_settings
    cpu_settings.apply_before_jax()

from absl import app  # noqa: E402

from launch import flags as launch_flags  # noqa: E402
from learned_optimizers import train  # noqa: E402

launch_flags.define_config_flags(train.Config)


def make_config() -> train.Config:
    """The run's config from the parsed flags."""
    return launch_flags.config_from_flags(train.Config)


def main(argv):
    del argv
    launch_flags.run(train.train_and_evaluate, make_config())


if __name__ == "__main__":
    app.run(main)
