"""Meta-trains the LSTM optimizer and evaluates it against tuned baselines:
`python -m launch.learned_optimizer --flagfile=launch/configs/lstm_quadratic.flags --workdir=...`.
"""

from absl import app

from launch import flags as launch_flags
from learned_optimizers import train

launch_flags.define_config_flags(train.Config)


def make_config() -> train.Config:
    """The run's config from the parsed flags."""
    return launch_flags.config_from_flags(train.Config)


def main(argv):
    del argv
    launch_flags.run(train.train_and_evaluate, make_config())


if __name__ == "__main__":
    app.run(main)
