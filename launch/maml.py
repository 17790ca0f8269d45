"""Meta-trains MAML, or Prototypical Networks with `--learner=protonet`:
`python -m launch.maml --flagfile=launch/configs/maml_sinusoid.flags --workdir=...`,
`python -m launch.maml --flagfile=launch/configs/maml_protonet_omniglot_20way1shot.flags ...`.
`--max_minutes=M` stops at the first checkpoint after M minutes; the same command continues."""

from absl import app

from launch import flags as launch_flags
from maml import train

launch_flags.define_config_flags(train.Config)


def make_config() -> train.Config:
    """The run's config from the parsed flags."""
    return launch_flags.config_from_flags(train.Config)


def main(argv):
    del argv
    launch_flags.run(train.train_and_evaluate, make_config())


if __name__ == "__main__":
    app.run(main)
