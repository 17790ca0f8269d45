"""Stride-1 correlation of a small feature map through the 2-D discrete Fourier transform.

With xp the input padded to Lh x Lw and a kernel k of kh x kw taps,

    y[m, n, o] = sum_{i, j, c} xp[m + i, n + j, c] k[i, j, c, o],   m <= Lh - kh, n <= Lw - kw,

is a circular correlation of period (Lh, Lw) that never wraps (m + i < Lh, n + j < Lw). With X
and K the 2-D DFTs of xp and of k zero-padded to Lh x Lw, and K* the complex conjugate,

    Y[u, v, o] = sum_c X[u, v, c] K*[u, v, c, o],        y = Re IDFT(Y)  (the needed m, n only).

x and k are real, so Y[-u, -v] = Y*[u, v] and one frequency of each conjugate pair determines
everything (`frequencies`, about Lh Lw / 2 of them): per output and input channel pair the
products take 4 real multiply-adds per frequency instead of the direct form's
(Lh - kh + 1)(Lw - kw + 1) kh kw; on a 7x7 map with a 5x5 kernel, 4 x 61 = 244 instead of
1,225. Each transform is one real matrix product with a constant DFT matrix (only the input's
unpadded rows and columns enter it), so autodiff's transposes are matrix products too. It is the
same function as `lax.conv_general_dilated` with that padding, up to float rounding.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def frequencies(lh: int, lw: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, weight) of one frequency of each conjugate pair of an Lh x Lw real map's DFT:
    Y[-u, -v] = Y*[u, v], so Re sum_{all u, v} Y e^{i angle} = sum weight Re(Y e^{i angle}) over
    these, weight 1 for a frequency that is its own pair and 2 otherwise."""
    u, v = np.meshgrid(np.arange(lh), np.arange(lw // 2 + 1), indexing="ij")
    keep = (2 * v % lw != 0) | (u <= lh // 2)  # in the columns v = 0 and v = Lw / 2, u <= Lh / 2
    u, v = u[keep], v[keep]
    weight = np.where((2 * u % lh == 0) & (2 * v % lw == 0), 1.0, 2.0)
    return u, v, weight


def forward_dft(lh: int, lw: int, rows: int, cols: int, top: int, left: int) -> np.ndarray:
    """[2, F, rows * cols] (real, imaginary; F the `frequencies`): the DFT of an Lh x Lw map
    that is zero but for a rows x cols block at (top, left), as a matrix on that block."""
    u, v, _ = frequencies(lh, lw)
    m, n = np.meshgrid(np.arange(rows) + top, np.arange(cols) + left, indexing="ij")
    angle = -2 * np.pi * (np.outer(u, m.ravel()) / lh + np.outer(v, n.ravel()) / lw)
    return np.stack([np.cos(angle), np.sin(angle)])


def inverse_dft_real(lh: int, lw: int, rows: int, cols: int) -> np.ndarray:
    """[rows * cols, 2, F]: Re IDFT at m < rows, n < cols of a real map's spectrum given by its
    real and imaginary parts at the `frequencies`."""
    u, v, weight = frequencies(lh, lw)
    m, n = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    angle = 2 * np.pi * (np.outer(m.ravel(), u) / lh + np.outer(n.ravel(), v) / lw)
    scale = weight / (lh * lw)
    return np.stack([np.cos(angle) * scale, -np.sin(angle) * scale], axis=1)


def multiply_adds(x_shape: Sequence[int], k_shape: Sequence[int], pads) -> tuple[int, int]:
    """(direct, spectral) multiply-adds per image of the correlation, transforms included."""
    _, h, w, cin = x_shape
    kh, kw, _, cout = k_shape
    lh, lw = h + sum(pads[0]), w + sum(pads[1])
    out = (lh - kh + 1) * (lw - kw + 1)
    f = len(frequencies(lh, lw)[0])
    return out * kh * kw * cin * cout, 4 * f * cin * cout + 2 * f * (h * w * cin + out * cout)


def correlation(x: jax.Array, k: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
    """Equals `lax.conv_general_dilated(x, k, (1, 1), pads, ('NHWC', 'HWIO', 'NHWC'))` for
    non-negative `pads`; x [B, H, W, I], k [kh, kw, I, O]."""
    b, h, w, cin = x.shape
    kh, kw, _, cout = k.shape
    (top, bottom), (left, right) = pads
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"spectral.correlation needs non-negative padding, got {pads}")
    lh, lw = h + top + bottom, w + left + right
    rows, cols = lh - kh + 1, lw - kw + 1
    to_x = forward_dft(lh, lw, h, w, top, left)                  # [2, F, h w]
    f = to_x.shape[1]
    to_x = jnp.asarray(to_x.transpose(1, 0, 2).reshape(2 * f, h * w), x.dtype)  # rows (F, 2)
    to_k = jnp.asarray(forward_dft(lh, lw, kh, kw, 0, 0).reshape(2 * f, kh * kw), x.dtype)
    back = jnp.asarray(inverse_dft_real(lh, lw, rows, cols).reshape(rows * cols, 2 * f), x.dtype)
    pixels_first = x.reshape(b, h * w, cin).transpose(1, 0, 2).reshape(h * w, b * cin)
    spectrum_x = (to_x @ pixels_first).reshape(f, 2 * b, cin)   # [F, (Xr; Xi), I]
    k_re, k_im = (to_k @ k.reshape(kh * kw, cin * cout)).reshape(2, f, cin, cout)
    # X K* = (Xr Kr + Xi Ki) + i (Xi Kr - Xr Ki), from one product per frequency of [Xr; Xi] with
    # [Kr, Ki]: [F, 2B, 2O], whose four blocks are Xr Kr, Xr Ki, Xi Kr, Xi Ki.
    products = jnp.einsum("fnc,fco->fno", spectrum_x, jnp.concatenate([k_re, k_im], axis=-1))
    with_re, with_im = products[..., :cout], products[..., cout:]
    spectrum_y = jnp.stack([with_re[:, :b] + with_im[:, b:],
                            with_re[:, b:] - with_im[:, :b]])   # [2, F, B, O]
    y = (back @ spectrum_y.reshape(2 * f, b * cout)).reshape(rows * cols, b, cout)
    return y.transpose(1, 0, 2).reshape(b, rows, cols, cout)
