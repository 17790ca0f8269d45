"""The TensorFlow DCGAN tutorial (tensorflow.org/tutorials/generative/dcgan): its models, losses,
optimizers and `train_step`, verbatim up to the batch size and the noise seed.

The baseline of `benchmarks.gan_speed` (throughput) and `benchmarks.gan_same_training` (FID per
epoch). TensorFlow is imported by the caller's first use, so that a process can set its
environment (threads, oneDNN) before it loads.
"""

from __future__ import annotations

from typing import Any, Callable

NOISE_DIM = 100


def make_generator_model():
    import tensorflow as tf
    from tensorflow.keras import layers
    return tf.keras.Sequential([
        layers.Input((NOISE_DIM,)),
        layers.Dense(7 * 7 * 256, use_bias=False), layers.BatchNormalization(),
        layers.LeakyReLU(), layers.Reshape((7, 7, 256)),
        layers.Conv2DTranspose(128, (5, 5), strides=(1, 1), padding="same", use_bias=False),
        layers.BatchNormalization(), layers.LeakyReLU(),
        layers.Conv2DTranspose(64, (5, 5), strides=(2, 2), padding="same", use_bias=False),
        layers.BatchNormalization(), layers.LeakyReLU(),
        layers.Conv2DTranspose(1, (5, 5), strides=(2, 2), padding="same", use_bias=False,
                               activation="tanh")])


def make_discriminator_model():
    import tensorflow as tf
    from tensorflow.keras import layers
    return tf.keras.Sequential([
        layers.Input((28, 28, 1)),
        layers.Conv2D(64, (5, 5), strides=(2, 2), padding="same"), layers.LeakyReLU(),
        layers.Dropout(0.3),
        layers.Conv2D(128, (5, 5), strides=(2, 2), padding="same"), layers.LeakyReLU(),
        layers.Dropout(0.3), layers.Flatten(), layers.Dense(1)])


def tutorial(batch_size: int, seed: int = 0) -> tuple[Callable[[Any], Any], Any]:
    """(train_step(images in [-1, 1]) -> (gen_loss, disc_loss), generator); TensorFlow's global
    seed is `seed` (initialisation, the step's noise, dropout)."""
    import tensorflow as tf
    tf.random.set_seed(seed)
    generator, discriminator = make_generator_model(), make_discriminator_model()
    cross_entropy = tf.keras.losses.BinaryCrossentropy(from_logits=True)
    generator_optimizer = tf.keras.optimizers.Adam(1e-4, epsilon=1e-7)
    discriminator_optimizer = tf.keras.optimizers.Adam(1e-4, epsilon=1e-7)

    def discriminator_loss(real_output, fake_output):
        return (cross_entropy(tf.ones_like(real_output), real_output)
                + cross_entropy(tf.zeros_like(fake_output), fake_output))

    def generator_loss(fake_output):
        return cross_entropy(tf.ones_like(fake_output), fake_output)

    @tf.function
    def train_step(images):
        noise = tf.random.normal([batch_size, NOISE_DIM])
        with tf.GradientTape() as gen_tape, tf.GradientTape() as disc_tape:
            generated_images = generator(noise, training=True)
            real_output = discriminator(images, training=True)
            fake_output = discriminator(generated_images, training=True)
            gen_loss = generator_loss(fake_output)
            disc_loss = discriminator_loss(real_output, fake_output)
        gradients_of_generator = gen_tape.gradient(gen_loss, generator.trainable_variables)
        gradients_of_discriminator = disc_tape.gradient(disc_loss,
                                                        discriminator.trainable_variables)
        generator_optimizer.apply_gradients(zip(gradients_of_generator,
                                                generator.trainable_variables))
        discriminator_optimizer.apply_gradients(zip(gradients_of_discriminator,
                                                    discriminator.trainable_variables))
        return gen_loss, disc_loss

    return train_step, generator
