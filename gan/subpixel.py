"""Strided transposed convolution computed as one stride-1 convolution per output phase.

`lax.conv_transpose(x, w, strides=(s, s), padding)` (without kernel transposition, as Flax's
`nn.ConvTranspose` calls it) is a correlation of the zero-dilated input with w:

    y[o] = sum_t xd[o + t - a] w[t],   xd[s i] = x[i] (zeros in between),

with `a` the leading padding lax derives from the kernel size, stride and padding mode. Splitting
the output by phase, o = s m + r, only the taps t = s d + a - r (d an integer offset) meet
non-zero inputs, so

    y[s m + r] = sum_d x[m + d] K[d, r],   K[d, r] = w[s d + a - r]  (0 where out of range).

All phases r share the offsets d, so the whole layer is ONE stride-1 convolution of x with a kernel
K of s*s times the output channels, followed by depth-to-space ("sub-pixel" convolution). It is
the same function of the same parameters, without the inserted zeros: XLA's CPU backend runs the
dilated form (and above all its weight gradient) on a slow generic path, and this one on its fast
convolution kernels. Gradients come from autodiff; the gather from w to K turns into a
scatter-add in the backward pass. With few output channels (the DCGAN's last layer: 4 phases x 1
channel) XLA's convolution kernels are slow too, and the stride-1 correlation is computed as one
matmul over the input channels followed by a sum of shifted slices (`shift_add_correlation`); on
small maps with many channels (the DCGAN's 7x7 ones) it is computed through the 2-D DFT
(`gan.spectral`), which skips the padding's multiply-adds and most of the taps'.

The input gradient of a strided convolution (`conv`, `PhaseConv`) is the same kind of dilated
correlation, of the output gradient with the flipped kernel; XLA computes it over inserted zeros,
`conv` phase by phase through a custom VJP.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gan import spectral


def _leading_padding(kernel: int, stride: int, padding: str) -> int:
    """The `a` of lax.conv_transpose's 'SAME' padding for one spatial dimension."""
    if padding != "SAME":
        raise ValueError(f"only padding='SAME' is implemented, got {padding!r}")
    pad_len = kernel + stride - 2
    return kernel - 1 if stride > kernel - 1 else int(np.ceil(pad_len / 2))


def phase_taps(kernel: int, stride: int, a: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """For one spatial dimension with leading padding `a`: tap index t[d, r] into w, its
    validity, and the range of d."""
    # t = s d + a - r in [0, kernel)  <=>  d in [ceil((r - a) / s), floor((kernel - 1 + r - a) / s)]
    d_min = min(-((a - r) // stride) for r in range(stride))
    d_max = max((kernel - 1 + r - a) // stride for r in range(stride))
    d = np.arange(d_min, d_max + 1)[:, None]
    r = np.arange(stride)[None, :]
    taps = stride * d + a - r
    valid = (taps >= 0) & (taps < kernel)
    return np.clip(taps, 0, kernel - 1), valid, d_min, d_max


def phase_kernel(w: jax.Array, strides: Sequence[int], leads: Sequence[int]):
    """Rearranges an HWIO kernel into the [Dh, Dw, I, sh * sw * O] kernel of all phases."""
    kh, kw, cin, cout = w.shape
    (sh, sw) = strides
    th, vh, dh0, dh1 = phase_taps(kh, sh, leads[0])
    tw, vw, dw0, dw1 = phase_taps(kw, sw, leads[1])
    # gathered[dh, rh, dw, rw, I, O] = w[th[dh, rh], tw[dw, rw]]
    gathered = w[th[:, :, None, None], tw[None, None, :, :]]
    mask = (vh[:, :, None, None] & vw[None, None, :, :]).astype(w.dtype)
    gathered = gathered * mask[..., None, None]
    k = gathered.transpose(0, 2, 4, 1, 3, 5)  # [Dh, Dw, I, rh, rw, O]
    return k.reshape(k.shape[0], k.shape[1], cin, sh * sw * cout), ((-dh0, dh1), (-dw0, dw1))


def conv_transpose(x: jax.Array, w: jax.Array, strides: Sequence[int],
                   padding: str = "SAME") -> jax.Array:
    """Equals `lax.conv_transpose(x, w, strides, padding, ('NHWC', 'HWIO', 'NHWC'))`.

    x: [B, H, W, I], w: [kh, kw, I, O]; returns [B, sh * H, sw * W, O].
    """
    leads = [_leading_padding(k, s, padding) for k, s in zip(w.shape[:2], strides)]
    return dilated_correlation(x, w, strides, leads)


def dilated_correlation(x: jax.Array, w: jax.Array, strides: Sequence[int],
                        leads: Sequence[int]) -> jax.Array:
    """y[o] = sum_t xd[o + t - a] w[t] for o < s * H (per spatial dimension, a = `leads`), xd
    the input dilated by the strides, computed phase by phase.

    x: [B, H, W, I], w: [kh, kw, I, O]; returns [B, sh * H, sw * W, O].
    """
    sh, sw = strides
    k, pads = phase_kernel(w, strides, leads)
    z = correlation(x, k, pads)
    b, h, wd, _ = z.shape
    z = z.reshape(b, h, wd, sh, sw, w.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(b, h * sh, wd * sw, w.shape[-1])


# Below this many output channels XLA's CPU convolution kernels are far from peak (the DCGAN's last
# layer: 4 phases x 1 channel); `shift_add_correlation` is then faster.
NARROW_OUTPUT = 16


# The spectral form is used where it needs at most this fraction of the direct form's
# multiply-adds (`spectral.multiply_adds`): the DCGAN's 7x7 maps, whose padding the direct form
# also multiplies.
SPECTRAL_MAX_FRACTION = 0.6


def correlation(x: jax.Array, k: jax.Array, pads) -> jax.Array:
    """Equals `lax.conv_general_dilated(x, k, (1, 1), pads, ('NHWC', 'HWIO', 'NHWC'))`."""
    if k.shape[-1] < NARROW_OUTPUT:
        return shift_add_correlation(x, k, pads)
    direct, spectral_form = spectral.multiply_adds(x.shape, k.shape, pads)
    if min(min(p) for p in pads) >= 0 and spectral_form <= SPECTRAL_MAX_FRACTION * direct:
        return spectral.correlation(x, k, pads)
    return lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def shift_add_correlation(x: jax.Array, k: jax.Array, pads) -> jax.Array:
    """The stride-1 correlation y[m, n] = sum_{i, j} xp[m + i, n + j] k[i, j] (xp: x padded by
    `pads`) as one matmul over the input channels, z[.., i, j] = x k[i, j] for all taps at once,
    then a sum of shifted slices, y[m, n] = sum_{i, j} zp[m + i, n + j, i, j].

    x: [B, H, W, I], k: [kh, kw, I, O] (HWIO), pads: ((low, high), (low, high))."""
    kh, kw, cin, cout = k.shape
    b, h, w, _ = x.shape
    z = x.reshape(-1, cin) @ k.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)
    z = lax.pad(z.reshape(b, h, w, kh, kw, cout), jnp.zeros((), z.dtype),
                [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)])
    out_h, out_w = z.shape[1] - kh + 1, z.shape[2] - kw + 1
    return sum(z[:, i:i + out_h, j:j + out_w, i, j] for i in range(kh) for j in range(kw))


class PhaseConvTranspose(nn.Module):
    """Drop-in for `nn.ConvTranspose(features, kernel_size, strides, padding, use_bias=False)`:
    the same parameter ('kernel', HWIO) and the same function, computed by `conv_transpose`."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    padding: str = "SAME"
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        return conv_transpose(x, kernel.astype(x.dtype), self.strides, self.padding)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(low, high) padding of lax's 'SAME' convolution for one spatial dimension."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int]) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_phase_input_gradient(x, w, strides):
    return _conv(x, w, strides)


def _conv_fwd(x, w, strides):
    return _conv(x, w, strides), (x, w)


def _conv_bwd(strides, residuals, g):
    """dL/dx[i] = sum_{m, t: s m + t - p = i} g[m] w[t]: a dilated correlation of g with the
    flipped kernel (input and output channels swapped), leading padding k - 1 - p."""
    x, w = residuals
    leads = [k - 1 - _same_padding(n, k, s)[0] for n, k, s in zip(x.shape[1:3], w.shape, strides)]
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = dilated_correlation(g, flipped, strides, leads)
    (dw,) = jax.linear_transpose(lambda w_: _conv(x, w_, strides), w)(g)
    return dx, dw


_conv_phase_input_gradient.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, w: jax.Array, strides: Sequence[int]) -> jax.Array:
    """Equals `lax.conv_general_dilated(x, w, strides, 'SAME', ('NHWC', 'HWIO', 'NHWC'))`.

    Its input gradient is a transposed convolution of the output gradient, which XLA computes
    over an input dilated with zeros; here it is computed phase by phase instead
    (`dilated_correlation`) when each spatial size is a multiple of its stride, so that the
    gradient has exactly `stride` times the output size. The weight gradient is XLA's.
    """
    strides = tuple(strides)
    if any(n % s for n, s in zip(x.shape[1:3], strides)):
        return _conv(x, w, strides)
    return _conv_phase_input_gradient(x, w, strides)


class PhaseConv(nn.Module):
    """Drop-in for `nn.Conv(features, kernel_size, strides, padding='SAME')`: the same parameters
    ('kernel' HWIO, 'bias') and the same function, computed by `conv`."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
        return conv(x, kernel, self.strides) + bias
