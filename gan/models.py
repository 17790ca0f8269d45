"""Generators and discriminators.

* `DCGANGenerator` / `DCGANDiscriminator`: the DCGAN of the TensorFlow tutorial
  ("Deep Convolutional Generative Adversarial Network"), layer for layer, with Keras' defaults
  made explicit: LeakyReLU slope 0.3, batch norm momentum 0.99 and epsilon 1e-3, Glorot-uniform
  kernels, zero biases. Images are 28x28x1 in [-1, 1].
* `MLPGenerator` / `MaxoutDiscriminator`: the fully connected MNIST GAN of Goodfellow et al.
  (2014), following the paper's public code (`mnist.yaml` of goodfeli/adversarial): generator
  100 -> ReLU 1200 -> ReLU 1200 -> sigmoid 784 with weights U[-0.05, 0.05]; discriminator
  784 -> maxout 240x5 -> maxout 240x5 -> 1 logit with weights U[-0.005, 0.005], and dropout on
  each layer's input (keep 0.8 on the image, 0.5 elsewhere; inverted-dropout scaling 1/keep equals
  the code's input scales 1.25 and 2). Gaussian noise, as the code's default. Images are in
  [0, 1]. Choices where the code does more: the generator's output bias starts at zero (the
  code initialises it from the data's pixel marginals), and biases start at zero.

Every generator maps noise [B, noise_dim] to images [B, 28, 28, 1]; every discriminator maps
images to one logit per image, [B].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gan import dropout, subpixel

IMAGE_SHAPE = (28, 28, 1)
NOISE_DIM = 100

_glorot = nn.initializers.glorot_uniform()


def _keras_batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3, name=name)


def _leaky_relu(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, negative_slope=0.3)


class DCGANGenerator(nn.Module):
    """Dense(7*7*256) -> BN -> LReLU -> ConvT(128, 5, 1) -> BN -> LReLU -> ConvT(64, 5, 2) -> BN
    -> LReLU -> ConvT(1, 5, 2) -> tanh; no biases (batch norm follows, or tanh at the output).

    `conv_transpose="phase"` computes the transposed convolutions as sub-pixel convolutions
    (`gan.subpixel`), the same function with the same parameters, fast on XLA's CPU backend;
    "lax" uses `nn.ConvTranspose` (`lax.conv_transpose`), the reference.
    """

    conv_transpose: str = "phase"

    def _deconv(self, features: int, stride: int, name: str) -> nn.Module:
        if self.conv_transpose == "lax":
            return nn.ConvTranspose(features, (5, 5), strides=(stride, stride), padding="SAME",
                                    use_bias=False, kernel_init=_glorot, name=name)
        if self.conv_transpose == "phase":
            return subpixel.PhaseConvTranspose(features, (5, 5), (stride, stride),
                                               kernel_init=_glorot, name=name)
        raise ValueError(f"conv_transpose must be 'phase' or 'lax', got {self.conv_transpose!r}")

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Dense(7 * 7 * 256, use_bias=False, kernel_init=_glorot, name="dense")(z)
        x = _leaky_relu(_keras_batch_norm(train, "bn0")(x))
        x = x.reshape(x.shape[0], 7, 7, 256)
        for i, (features, stride) in enumerate(((128, 1), (64, 2))):
            x = self._deconv(features, stride, f"deconv{i}")(x)
            x = _leaky_relu(_keras_batch_norm(train, f"bn{i + 1}")(x))
        x = self._deconv(1, 2, "deconv2")(x)
        return jnp.tanh(x)


class DCGANDiscriminator(nn.Module):
    """Conv(64, 5, 2) -> LReLU -> Dropout(0.3) -> Conv(128, 5, 2) -> LReLU -> Dropout(0.3)
    -> Flatten -> Dense(1).

    `conv="phase"` computes the strided convolutions' input gradients phase by phase
    (`gan.subpixel.conv`), "lax" with `nn.Conv`, the reference. `dropout="unrolled"` draws
    `nn.Dropout`'s masks bit for bit with an unrolled Threefry (`gan.dropout`), "flax" with
    `nn.Dropout`, the reference. Either way the same function of the same parameters.
    """

    dropout_rate: float = 0.3
    conv: str = "phase"
    dropout: str = "unrolled"

    def _conv(self, features: int, name: str) -> nn.Module:
        if self.conv == "lax":
            return nn.Conv(features, (5, 5), strides=(2, 2), padding="SAME", kernel_init=_glorot,
                           name=name)
        if self.conv == "phase":
            return subpixel.PhaseConv(features, (5, 5), (2, 2), kernel_init=_glorot, name=name)
        raise ValueError(f"conv must be 'phase' or 'lax', got {self.conv!r}")

    def _dropout(self, train: bool) -> nn.Module:
        if self.dropout == "flax":
            return nn.Dropout(self.dropout_rate, deterministic=not train)
        if self.dropout == "unrolled":
            return dropout.Dropout(self.dropout_rate, deterministic=not train)
        raise ValueError(f"dropout must be 'unrolled' or 'flax', got {self.dropout!r}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        for i, features in enumerate((64, 128)):
            x = self._conv(features, f"conv{i}")(x)
            x = self._dropout(train)(_leaky_relu(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(1, kernel_init=_glorot, name="dense")(x)[:, 0]


def _uniform(scale: float):
    """U[-scale, scale], pylearn2's `irange` initialisation."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


class MLPGenerator(nn.Module):
    hidden: tuple[int, ...] = (1200, 1200)

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
        x = z
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, kernel_init=_uniform(0.05), name=f"h{i}")(x))
        x = nn.sigmoid(nn.Dense(28 * 28, kernel_init=_uniform(0.05), name="y")(x))
        return x.reshape(x.shape[0], *IMAGE_SHAPE)


class Maxout(nn.Module):
    """max over `pieces` linear units for each of `units` outputs (Goodfellow et al., 2013)."""

    units: int
    pieces: int
    init_scale: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(self.units * self.pieces, kernel_init=_uniform(self.init_scale))(x)
        return jnp.max(y.reshape(*y.shape[:-1], self.units, self.pieces), axis=-1)


class MaxoutDiscriminator(nn.Module):
    units: int = 240
    pieces: int = 5
    input_keep: float = 0.8
    hidden_keep: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(1.0 - self.input_keep, deterministic=not train)(x)
        for i in range(2):
            x = Maxout(self.units, self.pieces, 0.005, name=f"h{i}")(x)
            x = nn.Dropout(1.0 - self.hidden_keep, deterministic=not train)(x)
        return nn.Dense(1, kernel_init=_uniform(0.005), name="y")(x)[:, 0]


MODELS: dict[str, tuple[type[nn.Module], type[nn.Module], tuple[float, float]]] = {
    # name: (generator, discriminator, image value range)
    "dcgan": (DCGANGenerator, DCGANDiscriminator, (-1.0, 1.0)),
    "mlp": (MLPGenerator, MaxoutDiscriminator, (0.0, 1.0)),
}


def get_models(name: str) -> tuple[nn.Module, nn.Module, tuple[float, float]]:
    if name not in MODELS:
        raise ValueError(f"Unknown GAN model {name!r}; choose one of {', '.join(MODELS)}.")
    generator, discriminator, value_range = MODELS[name]
    return generator(), discriminator(), value_range

