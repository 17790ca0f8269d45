"""Architecture search.

    python -m launch.nas --flagfile=launch/configs/nas_macro_reinforce.flags --workdir=...

On several devices the children of the CNN space train data-parallel (global --batch_size split
over all devices); on several processes run the same command on each, with the multi-process
flags: every process runs the same search, process 0 alone writes the results, and the workdir
must be on a filesystem all of them see.
"""

from absl import app, flags

from launch import flags as launch_flags
from nas import controller, search

flags.DEFINE_enum("algorithm", None, list(search.ALGORITHMS), "Search algorithm.")
flags.DEFINE_enum("space", None, list(search.SPACES),
                  "nas_bench_macro: tabular CIFAR-10 benchmark (no training); cnn: Zoph & Le's "
                  "CNN space with child networks trained on --dataset.")
flags.DEFINE_integer("budget", None, "Architectures evaluated; a rerun with a larger value "
                     "continues.")
flags.DEFINE_integer("architectures_per_step", None, "REINFORCE: m, architectures per "
                     "controller step.")
flags.DEFINE_integer("controller_hidden_size", None, "Controller LSTM units per layer.")
flags.DEFINE_integer("controller_num_layers", None, "Controller LSTM layers.")
flags.DEFINE_float("controller_init_range", None, "Controller weights start uniform in +-this.")
flags.DEFINE_float("learning_rate", None, "Controller Adam learning rate.")
flags.DEFINE_float("entropy_weight", None, "Weight of the policy-entropy bonus.")
flags.DEFINE_float("baseline_decay", None, "Decay of the reward moving-average baseline.")
flags.DEFINE_enum("reward_transform", None, list(controller.REWARD_TRANSFORMS),
                  "Transform of the reward in the policy gradient (cubed: Zoph & Le).")
flags.DEFINE_integer("population_size", None, "Regularized evolution: population P.")
flags.DEFINE_integer("tournament_size", None, "Regularized evolution: tournament S.")
flags.DEFINE_integer("num_layers", None, "CNN space: layers of a child network.")
flags.DEFINE_multi_integer("filter_sizes", None, "CNN space: choices of filter height and width "
                           "(repeat the flag: --filter_sizes=1 --filter_sizes=3 ...).")
flags.DEFINE_multi_integer("num_filters", None, "CNN space: choices of the number of filters.")
flags.DEFINE_multi_integer("strides", None, "CNN space: choices of the stride.")
flags.DEFINE_float("child_learning_rate", None, "CNN space: child Adam learning rate.")
flags.DEFINE_integer("validation_size", None, "CNN space: training examples held out for "
                     "validation.")
flags.DEFINE_enum("padding", None, ["SAME", "VALID"], "CNN space: convolution padding.")
flags.DEFINE_integer("final_num_steps", None, "CNN space: training steps of the final retraining "
                     "of the best architecture (test accuracy).")


def make_config() -> search.Config:
    """The run's config from the parsed flags."""
    return launch_flags.config_from_flags(search.Config)


def main(argv):
    del argv
    launch_flags.setup()
    search.train_and_evaluate(make_config(), launch_flags.FLAGS.workdir,
                              launch_flags.FLAGS.overwrite)


if __name__ == "__main__":
    app.run(main)
