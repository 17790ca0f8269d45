"""Meta-trains the LSTM optimizer and evaluates it against tuned baselines:
`python -m launch.learned_optimizer --flagfile=launch/configs/lstm_quadratic.flags --workdir=...`.
"""

from absl import app, flags

from launch import flags as launch_flags
from learned_optimizers import lstm, meta_train, tasks

flags.DEFINE_enum("task", None, list(tasks.FAMILIES), "Task family to meta-train on.")
flags.DEFINE_enum("data_split", None, list(tasks.DATA_SPLITS),
                  "train_test: meta-train on the train split, evaluate on test; test_halves: two "
                  "fixed halves of the test split (MNIST with only its test files at hand).")
flags.DEFINE_integer("pool", None, "MLP tasks: average-pool the images pool x pool first.")
flags.DEFINE_enum("preprocessing", None, list(lstm.PREPROCESSING),
                  "Gradient preprocessing: log_sign (the paper's appendix) or identity.")
flags.DEFINE_float("output_scale", None, "Update = output_scale * LSTM output.")
flags.DEFINE_integer("hidden_size", None, "LSTM hidden units per layer.")
flags.DEFINE_integer("num_layers", None, "LSTM layers.")
flags.DEFINE_integer("horizon", None, "Optimizer steps per task during meta-training (T).")
flags.DEFINE_integer("unroll_length", None, "Steps per truncated unroll (K); T % K == 0.")
flags.DEFINE_integer("meta_batch_size", None, "Tasks per meta-step (over all devices).")
flags.DEFINE_float("meta_learning_rate", None, "Adam learning rate of the meta-optimizer.")
flags.DEFINE_enum("meta_lr_schedule", None, list(meta_train.META_LR_SCHEDULES),
                  "Meta learning rate: constant, or cosine decay to 0 over --num_steps.")
flags.DEFINE_float("meta_clip_norm", None, "Global-norm clip of the meta-gradient.")
flags.DEFINE_bool("second_order", None, "Keep second derivatives of f in the meta-gradient.")
flags.DEFINE_enum("estimator", None, list(meta_train.ESTIMATORS),
                  "Meta-gradient estimator: tbptt (truncated backpropagation, the paper) or pes "
                  "(Persistent Evolution Strategies, unbiased under truncation).")
flags.DEFINE_float("pes_sigma", None, "PES: standard deviation of the perturbations of the "
                   "meta-parameters.")
flags.DEFINE_integer("eval_seed", None, "Seed of the validation and test tasks.")
flags.DEFINE_integer("validate_every", None, "Score the optimizer on validation tasks every N steps.")
flags.DEFINE_integer("num_validation_tasks", None, "Validation tasks (model and LR selection).")
flags.DEFINE_integer("num_test_tasks", None, "Held-out test tasks of the final evaluation.")
flags.DEFINE_multi_integer("eval_horizons", None, "Steps at which final losses are reported.")
flags.DEFINE_list("transfer_tasks", None, "Other task families to evaluate the optimizer on.")
flags.DEFINE_bool("evaluate", None, "Evaluate against tuned baselines after meta-training.")


def make_config() -> meta_train.Config:
    """The run's config from the parsed flags."""
    return launch_flags.config_from_flags(meta_train.Config)


def main(argv):
    del argv
    launch_flags.setup()
    meta_train.train_and_evaluate(make_config(), launch_flags.FLAGS.workdir,
                                  launch_flags.FLAGS.overwrite)


if __name__ == "__main__":
    app.run(main)
