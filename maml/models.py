"""The paper's networks, and their split into adapted (fast) and meta-learned-only (slow)
parameters.

* `MLP`: sinusoid regression, 1 -> 40 -> 40 -> 1 with ReLU.
* `Conv4`: Omniglot, four blocks of [3x3 convolution, 64 filters, stride 2 -> batch norm -> ReLU],
  the mean over the remaining 2x2 positions, and a linear head to the N classes.

Batch norm, as in the paper's code (`tf.contrib.layers.batch_norm` with its defaults): every forward
pass normalises with the statistics of the batch it is given -- in meta-training and at test time;
no running averages exist. The normalisation has an offset β and no scale (`scale=False`); β is
meta-learned by the outer optimizer and NOT adapted in the inner loop (it is a slow parameter). The
convolutions have no bias: a bias before batch-statistics normalisation cancels exactly.

Which batch gives the statistics is explicit (`stats_rows`): by default each call normalises with
its own input. Scoring a query set that way is transductive -- query examples share statistics
(the paper's protocol; support statistics never see the query). `stats_rows=n` normalises every
row with the statistics of the first n rows only; `classification_learner(...,
bn_statistics="support")` uses it to score queries with the support set's statistics, so each query
prediction depends on no other query example.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

SLOW_PREFIXES = ("norm",)  # modules whose parameters the inner loop does not adapt


class MLP(nn.Module):
    hidden: tuple[int, ...] = (40, 40)
    outputs: int = 1

    @nn.compact
    def __call__(self, x, stats_rows=None):
        del stats_rows
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
        return nn.Dense(self.outputs, name="head")(x)


class BatchStatNorm(nn.Module):
    """y = (x − mean) / sqrt(var + ε) + β, mean and var over the first `stats_rows` rows and all
    spatial positions of the batch x; β per channel, no scale (the paper's code)."""
    epsilon: float = 1e-3  # TensorFlow's default

    @nn.compact
    def __call__(self, x, stats_rows=None):
        offset = self.param("offset", nn.initializers.zeros, (x.shape[-1],), x.dtype)
        ref = x if stats_rows is None else x[:stats_rows]
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(ref, axis=axes)
        var = jnp.mean(jnp.square(ref - mean), axis=axes)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) + offset


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(low, high) zero padding of TensorFlow's / XLA's "SAME" along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def patches(x, kernel: int, stride: int):
    """im2col: [B, H, W, C] -> [B, H', W', kernel * kernel * C], "SAME" padding, the features in
    (row, column, channel) order -- the order of a flattened [kh, kw, C_in, C_out] kernel."""
    (top, bottom), (left, right) = (same_padding(x.shape[1], kernel, stride),
                                    same_padding(x.shape[2], kernel, stride))
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = (x.shape[1] - kernel) // stride + 1, (x.shape[2] - kernel) // stride + 1
    return jnp.concatenate([
        jax.lax.slice(x, (0, i, j, 0),
                      (x.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1,
                       x.shape[3]), (1, stride, stride, 1))
        for i in range(kernel) for j in range(kernel)], axis=-1)


class PatchConv(nn.Module):
    """A bias-free "SAME" convolution computed as im2col and one matrix product.

    Same parameters (`kernel`, [kh, kw, C_in, C_out], Flax's initialiser) and outputs as
    `nn.Conv(use_bias=False, padding="SAME")`. Under `jax.vmap` over per-task kernels it becomes
    a batched matrix product, which XLA's CPU backend runs fast, where a vmapped convolution
    becomes a grouped convolution it runs slowly.
    """
    features: int
    kernel_size: int = 3
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                            x.dtype)
        cols = patches(x, self.kernel_size, self.strides)
        return cols @ kernel.reshape(-1, self.features)


CONV_IMPLS = ("xla", "patches")


class Conv4(nn.Module):
    num_classes: int
    filters: int = 64
    blocks: int = 4
    strides: int = 2  # Omniglot: stride-2 convolutions, no pooling
    conv_impl: str = "xla"  # "xla": lax.conv; "patches": im2col + matmul (PatchConv)

    @nn.compact
    def __call__(self, x, stats_rows=None):
        for i in range(self.blocks):
            if self.conv_impl == "patches":
                x = PatchConv(self.filters, 3, self.strides, name=f"conv_{i}")(x)
            else:
                x = nn.Conv(self.filters, (3, 3), strides=self.strides, padding="SAME",
                            use_bias=False, name=f"conv_{i}")(x)
            x = nn.relu(BatchStatNorm(name=f"norm_{i}")(x, stats_rows))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def split_params(params, slow_prefixes=SLOW_PREFIXES):
    """Flax `params` -> (fast, slow): slow are the modules whose names start with a slow prefix."""
    flat = traverse_util.flatten_dict(params)
    is_slow = lambda path: path[0].startswith(slow_prefixes)  # noqa: E731
    fast = {k: v for k, v in flat.items() if not is_slow(k)}
    slow = {k: v for k, v in flat.items() if is_slow(k)}
    return traverse_util.unflatten_dict(fast), traverse_util.unflatten_dict(slow)


def merge_params(fast, slow):
    """Inverse of `split_params`."""
    flat = {**traverse_util.flatten_dict(fast), **traverse_util.flatten_dict(slow)}
    return traverse_util.unflatten_dict(flat)


def init_split(model: nn.Module, key: jax.Array, example_input: jax.Array,
               slow_prefixes=SLOW_PREFIXES):
    """(fast, slow) initial parameters of `model`."""
    return split_params(model.init(key, example_input)["params"], slow_prefixes)
