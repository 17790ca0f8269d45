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
scatter-add in the backward pass.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _leading_padding(kernel: int, stride: int, padding: str) -> int:
    """The `a` of lax.conv_transpose's 'SAME' padding for one spatial dimension."""
    if padding != "SAME":
        raise ValueError(f"only padding='SAME' is implemented, got {padding!r}")
    pad_len = kernel + stride - 2
    return kernel - 1 if stride > kernel - 1 else int(np.ceil(pad_len / 2))


def phase_taps(kernel: int, stride: int, padding: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """For one spatial dimension: tap index t[d, r] into w, its validity, and the range of d."""
    a = _leading_padding(kernel, stride, padding)
    # t = s d + a - r in [0, kernel)  <=>  d in [ceil((r - a) / s), floor((kernel - 1 + r - a) / s)]
    d_min = min(-((a - r) // stride) for r in range(stride))
    d_max = max((kernel - 1 + r - a) // stride for r in range(stride))
    d = np.arange(d_min, d_max + 1)[:, None]
    r = np.arange(stride)[None, :]
    taps = stride * d + a - r
    valid = (taps >= 0) & (taps < kernel)
    return np.clip(taps, 0, kernel - 1), valid, d_min, d_max


def phase_kernel(w: jax.Array, strides: Sequence[int], padding: str):
    """Rearranges an HWIO kernel into the [Dh, Dw, I, sh * sw * O] kernel of all phases."""
    kh, kw, cin, cout = w.shape
    (sh, sw) = strides
    th, vh, dh0, dh1 = phase_taps(kh, sh, padding)
    tw, vw, dw0, dw1 = phase_taps(kw, sw, padding)
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
    sh, sw = strides
    k, pads = phase_kernel(w, strides, padding)
    z = lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    b, h, wd, _ = z.shape
    z = z.reshape(b, h, wd, sh, sw, w.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
    return z.reshape(b, h * sh, wd * sw, w.shape[-1])


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
