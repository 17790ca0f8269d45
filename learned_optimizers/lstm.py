"""The coordinatewise LSTM optimizer of Andrychowicz et al. (2016) as an optax transformation.

Every coordinate i of every parameter tensor is updated by the same small recurrent network m with
meta-parameters φ, each coordinate carrying its own recurrent state s_i:

    x_i       = ρ(g_i)                                 (gradient preprocessing)
    o_i, s_i' = m(x_i, s_i; φ)                         (two LSTM layers, then a linear output)
    u_i       = scale · o_i,      θ_i ← θ_i + u_i      (the update optax adds to the parameter)

One LSTM layer (`common.lstm.lstm_cell`) with input x, hidden state h and cell c (σ the logistic
function, ⊙ elementwise):

    [i, f, g, o] = x W_x + h W_h + b
    c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g),       h' = σ(o) ⊙ tanh(c')

Layer 2 reads layer 1's h'; the output is o_i = h'_2 · w + b. The forget-gate bias starts at 1.

Preprocessing (the paper's appendix), with p = 10:

    ρ(g) = (log|g| / p, sign g)   if |g| ≥ e^{-p}
    ρ(g) = (-1, e^{p} g)          otherwise

or the identity ρ(g) = g (the paper's quadratic experiments), selected by `preprocessing`.

How it is computed: all the coordinates of the parameter pytree form one batch of N columns
(`jax.flatten_util.ravel_pytree` order), the network runs on column vectors
(`common.lstm.lstm_cell_columns`: each gate a contiguous [H, N] block), in a few column blocks
(`num_blocks`: smaller working sets, independent calls for XLA to spread over the cores), and each
step is rematerialised in the backward pass (`jax.checkpoint`, `remat`): a meta-gradient through K
steps keeps only the states, not K steps of gate activations.

`lstm_optimizer(meta_params)` is an `optax.GradientTransformation` on any parameter pytree: its
state holds (h, c) of every layer for every coordinate, one [hidden_size, N] array per layer.
`save` / `load` write and read the meta-parameters and the settings needed to rebuild the optimizer
as one `.npz` file.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from common import lstm as common_lstm

PREPROCESSING = ("log_sign", "identity")
INPUT_SIZE = {"log_sign": 2, "identity": 1}
LOG_SIGN_P = 10.0
NUM_BLOCKS = 4  # column blocks of the coordinates, each its own network call (lstm_optimizer)


def preprocess(grads: jax.Array, preprocessing: str = "log_sign",
               p: float = LOG_SIGN_P) -> jax.Array:
    """The LSTM's input per coordinate: shape grads.shape + (INPUT_SIZE[preprocessing],)."""
    if preprocessing == "identity":
        return grads[..., None]
    if preprocessing != "log_sign":
        raise ValueError(f"Unknown preprocessing {preprocessing!r}; choose one of {PREPROCESSING}.")
    magnitude = jnp.abs(grads)
    large = magnitude >= jnp.exp(-p)
    log_magnitude = jnp.log(jnp.where(large, magnitude, 1.0)) / p  # where(): no log(0) gradient
    first = jnp.where(large, log_magnitude, -1.0)
    second = jnp.where(large, jnp.sign(grads), jnp.exp(p) * grads)
    return jnp.stack([first, second], axis=-1)


def init_meta_params(key: jax.Array, preprocessing: str = "log_sign", hidden_size: int = 20,
                     num_layers: int = 2, output_init_scale: float = 0.1) -> dict[str, Any]:
    """φ: per layer W_x [in, 4H], W_h [H, 4H] ~ N(0, 1/fan_in), b [4H] = 0 but forget bias 1;
    output w [H] ~ N(0, output_init_scale² / H), b = 0."""
    sizes = [INPUT_SIZE[preprocessing]] + [hidden_size] * (num_layers - 1)
    shapes = [s for size in sizes
              for s in ((size, 4 * hidden_size), (hidden_size, 4 * hidden_size))]
    noise = jax.random.normal(key, (sum(a * b for a, b in shapes) + hidden_size,))
    pieces = jnp.split(noise, np.cumsum([a * b for a, b in shapes]))
    params = {}
    for layer, size in enumerate(sizes):
        w_x, w_h = pieces[2 * layer], pieces[2 * layer + 1]
        params[f"layer{layer}"] = {
            "w_x": w_x.reshape(size, 4 * hidden_size) / np.sqrt(size),
            "w_h": w_h.reshape(hidden_size, 4 * hidden_size) / np.sqrt(hidden_size),
            "b": jnp.zeros(4 * hidden_size).at[hidden_size:2 * hidden_size].set(1.0),
        }
    params["output"] = {"w": output_init_scale * pieces[-1] / np.sqrt(hidden_size),
                        "b": jnp.zeros(())}
    return params


def network(meta_params: dict[str, Any], x: jax.Array, h: tuple[jax.Array, ...],
            c: tuple[jax.Array, ...]):
    """m(x, s; φ) on N coordinates as columns: x [in, N], h and c one [H, N] per layer ->
    (output [N], h', c')."""
    new_h, new_c = [], []
    inputs = x
    for layer, (h_l, c_l) in enumerate(zip(h, c)):
        inputs, cell = common_lstm.lstm_cell_columns(meta_params[f"layer{layer}"], inputs, h_l, c_l)
        new_h.append(inputs)
        new_c.append(cell)
    output = meta_params["output"]["w"] @ inputs + meta_params["output"]["b"]
    return output, tuple(new_h), tuple(new_c)


class LSTMOptimizerState(NamedTuple):
    """Per-coordinate recurrent state: per layer an [H, N] array, N the number of coordinates."""
    h: tuple[jax.Array, ...]
    c: tuple[jax.Array, ...]


def num_layers_and_hidden(meta_params: dict[str, Any]) -> tuple[int, int]:
    layers = sum(1 for name in meta_params if name.startswith("layer"))
    return layers, meta_params["layer0"]["w_h"].shape[0]


def column_blocks(x: jax.Array, num_blocks: int) -> list[jax.Array]:
    """x [..., N] as `num_blocks` (at most N) consecutive column blocks of near-equal widths."""
    n = x.shape[-1]
    k = max(1, min(num_blocks, n))
    return jnp.split(x, [round(i * n / k) for i in range(1, k)], axis=-1)


def blocked_network(step, meta_params: dict[str, Any], x: jax.Array, h: tuple[jax.Array, ...],
                    c: tuple[jax.Array, ...], num_blocks: int):
    """`step` (the network, or its rematerialised form) on each column block of the
    coordinates, the results joined: the same values and derivatives as one call."""
    h_blocks = [column_blocks(a, num_blocks) for a in h]  # [layer][block]
    c_blocks = [column_blocks(a, num_blocks) for a in c]
    outputs = [step(meta_params, x_b, tuple(a[j] for a in h_blocks), tuple(a[j] for a in c_blocks))
               for j, x_b in enumerate(column_blocks(x, num_blocks))]
    join = lambda parts: jnp.concatenate(parts, axis=-1)  # noqa: E731
    out = join([o for o, _, _ in outputs])
    new_h = tuple(join(parts) for parts in zip(*(h_b for _, h_b, _ in outputs)))
    new_c = tuple(join(parts) for parts in zip(*(c_b for _, _, c_b in outputs)))
    return out, new_h, new_c


def lstm_optimizer(meta_params: dict[str, Any], scale: float = 1.0, preprocessing: str = "log_sign",
                   remat: bool = True, num_blocks: int = NUM_BLOCKS
                   ) -> optax.GradientTransformation:
    """The learned optimizer: updates u = scale · m(ρ(g), s; φ), coordinate by coordinate.

    With `remat` a derivative through it recomputes each step's gates instead of storing them;
    the coordinates go through the network in `num_blocks` column blocks (`blocked_network`)."""
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"Unknown preprocessing {preprocessing!r}; choose one of {PREPROCESSING}.")
    in_size = meta_params["layer0"]["w_x"].shape[0]
    if in_size != INPUT_SIZE[preprocessing]:
        raise ValueError(f"These meta-parameters take {in_size} inputs per coordinate; "
                         f"preprocessing {preprocessing!r} gives {INPUT_SIZE[preprocessing]}.")
    layers, hidden = num_layers_and_hidden(meta_params)
    step = jax.checkpoint(network) if remat else network

    def init(params):
        flat, _ = ravel_pytree(params)
        zeros = tuple(jnp.zeros((hidden, flat.size), flat.dtype) for _ in range(layers))
        return LSTMOptimizerState(h=zeros, c=zeros)

    def update(grads, state, params=None):
        del params
        flat, unravel = ravel_pytree(grads)
        x = preprocess(flat, preprocessing).T.astype(state.h[0].dtype)
        out, h, c = blocked_network(step, meta_params, x, state.h, state.c, num_blocks)
        same_dtype = lambda new, old: tuple(a.astype(b.dtype) for a, b in zip(new, old))  # noqa: E731
        return (unravel((scale * out).astype(flat.dtype)),
                LSTMOptimizerState(h=same_dtype(h, state.h), c=same_dtype(c, state.c)))

    return optax.GradientTransformation(init, update)


def save(path: str, meta_params: dict[str, Any], scale: float = 1.0,
         preprocessing: str = "log_sign") -> str:
    """Writes φ and the optimizer's settings to one `.npz` file (one array per leaf, named by its
    '/'-joined path); returns its path."""
    flat = {name: np.asarray(v)
            for name, v in traverse_util.flatten_dict(meta_params, sep="/").items()}
    settings = json.dumps({"scale": float(scale), "preprocessing": preprocessing})
    with open(path, "wb") as f:
        np.savez(f, __settings__=np.asarray(settings), **flat)
    return path


def load(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a `save`d file: (meta_params, settings), so that
    `lstm_optimizer(meta_params, **settings)` rebuilds the optimizer."""
    with np.load(path) as archive:
        settings = json.loads(str(archive["__settings__"]))
        flat = {name: jnp.asarray(archive[name]) for name in archive.files
                if name != "__settings__"}
    return traverse_util.unflatten_dict(flat, sep="/"), settings


def load_optimizer(path: str) -> optax.GradientTransformation:
    """The meta-trained optimizer saved at `path`, ready for `optax.chain` or a train loop."""
    meta_params, settings = load(path)
    return lstm_optimizer(meta_params, **settings)
