"""Trains a GAN: `python -m launch.gan --flagfile=launch/configs/demo.flags`."""

from absl import app, flags

from gan import losses, models, train
from launch import flags as launch_flags

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
flags.DEFINE_integer("num_epochs", None, "Epochs (ignored when --num_steps is given).")
flags.DEFINE_integer("sample_every", None, "Write a sample grid every this many steps.")
flags.DEFINE_integer("num_samples", None, "Images in the sample grid.")


def main(argv):
    del argv
    launch_flags.setup()
    config = launch_flags.config_from_flags(train.Config)
    train.train_and_evaluate(config, launch_flags.FLAGS.workdir, launch_flags.FLAGS.overwrite)


if __name__ == "__main__":
    app.run(main)
