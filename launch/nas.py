"""Architecture search.

    python -m launch.nas --flagfile=launch/configs/nas_macro_reinforce.flags --workdir=...

On several devices the children of the CNN space train data-parallel (global --child_batch_size
split over all devices); on several processes run the same command on each, with the
multi-process flags: every process runs the same search, process 0 alone writes the results, and
the workdir must be on a filesystem all of them see.
"""

from absl import app

from launch import flags as launch_flags
from nas import train

launch_flags.define_config_flags(train.Config)


def make_config() -> train.Config:
    """The run's config from the parsed flags."""
    return launch_flags.config_from_flags(train.Config)


def main(argv):
    del argv
    launch_flags.run(train.train_and_evaluate, make_config())


if __name__ == "__main__":
    app.run(main)
