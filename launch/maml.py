"""Meta-trains MAML, or Prototypical Networks with `--learner=protonet`:
`python -m launch.maml --flagfile=launch/configs/maml_sinusoid.flags --workdir=...`,
`python -m launch.maml --flagfile=launch/configs/maml_protonet_omniglot_20way1shot.flags ...`.
`--max_minutes=M` stops at the first checkpoint after M minutes; the same command continues."""

if __name__ == "__main__":  # before JAX starts: XLA flags and glibc malloc (common/cpu_settings.py)
    from common import cpu_settings
    cpu_settings.apply_before_jax()

from absl import app  # noqa: E402

from launch import flags as launch_flags  # noqa: E402
from maml import train  # noqa: E402

launch_flags.define_config_flags(train.Config)


def make_config() -> train.Config:
    """The run's config from the parsed flags."""
    return launch_flags.config_from_flags(train.Config)


def main(argv):
    del argv
    launch_flags.run(train.train_and_evaluate, make_config())


if __name__ == "__main__":
    app.run(main)
