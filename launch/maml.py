"""Meta-trains MAML: `python -m launch.maml --flagfile=launch/configs/maml_sinusoid.flags`."""

import dataclasses

from absl import app, flags

from launch import flags as launch_flags
from maml import core, tasks, train

flags.DEFINE_integer("ways", None, "N: classes per episode (omniglot).")
flags.DEFINE_integer("shots", None, "K: support examples per class (sinusoid: support points).")
flags.DEFINE_integer("queries", None, "Query examples per class (sinusoid: query points).")
flags.DEFINE_integer("inner_steps", None, "Inner gradient steps in meta-training.")
flags.DEFINE_float("inner_lr", None, "Inner learning rate (initial value when learned).")
flags.DEFINE_bool("first_order", None, "First-order MAML: no gradient through inner gradients.")
flags.DEFINE_enum("learn_inner_lr", None, list(core.LEARN_INNER_LR),
                  "none: MAML; per_parameter: Meta-SGD; per_layer_per_step: MAML++ LSLR.")
flags.DEFINE_bool("multi_step_loss", None, "MAML++ multi-step loss (annealed weights).")
flags.DEFINE_integer("multi_step_anneal_steps", None,
                     "Meta-iterations over which the multi-step weights reach the last step.")
flags.DEFINE_bool("adapt_only_head", None, "ANIL: adapt only the output layer in the inner loop.")
flags.DEFINE_enum("task_batching", None, list(core.TASK_BATCHING),
                  "How the meta-batch is computed (same numbers): vmap, unrolled, map, auto.")
flags.DEFINE_enum("conv_impl", None, list(train.CONV_IMPLS),
                  "Convolutions: xla (lax.conv), patches (im2col + matmul), auto (patches on CPU).")
flags.DEFINE_enum("bn_statistics", None, list(tasks.BN_STATISTICS),
                  "Query batch-norm statistics: transductive (paper) or support.")
flags.DEFINE_integer("filters", None, "Conv4 filters per layer.")
flags.DEFINE_float("meta_lr", None, "Adam learning rate of the meta-update.")
flags.DEFINE_integer("test_inner_steps", None, "Inner steps at evaluation.")
flags.DEFINE_list("test_shots", None, "Sinusoid: K values to evaluate.")
flags.DEFINE_integer("eval_episodes", None, "Test episodes of the final evaluation.")
flags.DEFINE_integer("eval_every", None, "Meta-iterations between quick evaluations.")
flags.DEFINE_integer("eval_episodes_during_training", None, "Episodes of a quick evaluation.")
flags.DEFINE_integer("baseline_steps", None, "Sinusoid: training steps of the pretrained baseline.")
flags.DEFINE_integer("train_characters", None, "Omniglot characters to meta-train on (1200).")
flags.DEFINE_bool("rotate", None, "Omniglot: rotations by 90 degrees as new classes.")
flags.DEFINE_string("cache_dir", None, "Where the decoded Omniglot array is cached.")
flags.DEFINE_bool("evaluate", None, "Evaluate on held-out tasks after meta-training.")


def make_config() -> train.Config:
    """The run's config from the parsed flags."""
    config = launch_flags.config_from_flags(train.Config)
    if config.test_shots:
        config = dataclasses.replace(config, test_shots=tuple(int(k) for k in config.test_shots))
    return config


def main(argv):
    del argv
    launch_flags.setup()
    train.train_and_evaluate(make_config(), launch_flags.FLAGS.workdir,
                             launch_flags.FLAGS.overwrite)


if __name__ == "__main__":
    app.run(main)
