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

With `block_size` = B > 0 the network runs on blocks of B coordinates of a parameter tensor at a
time (`blocked_network`, `lax.map`), each block rematerialised in the backward pass: the same
function and the same derivatives, but a block's gate activations stay in the CPU's cache instead
of being written to memory for all coordinates at once and read back by the backward pass.

`lstm_optimizer(meta_params)` is an `optax.GradientTransformation` on any parameter pytree: its
state holds (h, c) of both layers for every coordinate, a pytree shaped like the parameters with two
trailing axes [num_layers, hidden_size]. `save` / `load` write and read the meta-parameters and the
settings needed to rebuild the optimizer as one `.npz` file.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from common import lstm as common_lstm

PREPROCESSING = ("log_sign", "identity")
INPUT_SIZE = {"log_sign": 2, "identity": 1}
LOG_SIGN_P = 10.0


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


def network(meta_params: dict[str, Any], x: jax.Array, h: jax.Array, c: jax.Array):
    """m(x, s; φ) on N coordinates: x [N, in], h and c [N, L, H] -> (output [N], h', c')."""
    new_h, new_c = [], []
    inputs = x
    for layer in range(h.shape[-2]):
        inputs, cell = common_lstm.lstm_cell(meta_params[f"layer{layer}"], inputs, h[:, layer],
                                             c[:, layer])
        new_h.append(inputs)
        new_c.append(cell)
    output = inputs @ meta_params["output"]["w"] + meta_params["output"]["b"]
    return output, jnp.stack(new_h, axis=1), jnp.stack(new_c, axis=1)


def pad_to_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """[N, ...] -> [ceil(N / B), B, ...], zero rows appended."""
    pad = (-x.shape[0]) % block_size
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, block_size, *x.shape[1:])


def blocked_network(meta_params: dict[str, Any], x: jax.Array, h: jax.Array, c: jax.Array,
                    block_size: int):
    """`network` computed B = `block_size` coordinates at a time, each block under
    `jax.checkpoint`: equal values, and derivatives equal up to the order of summation of the
    per-coordinate terms of ∂/∂φ. Leaves of at most B coordinates go through `network` whole."""
    n = x.shape[0]
    if n <= block_size:
        return network(meta_params, x, h, c)
    block = jax.checkpoint(lambda args: network(meta_params, *args))
    out, new_h, new_c = jax.lax.map(block, tuple(pad_to_blocks(a, block_size) for a in (x, h, c)))
    unblock = lambda a: a.reshape(-1, *a.shape[2:])[:n]  # noqa: E731
    return unblock(out), unblock(new_h), unblock(new_c)


class LSTMOptimizerState(NamedTuple):
    """Per-coordinate recurrent state: pytrees shaped like the params, leaves [*shape, L, H]."""
    h: Any
    c: Any


def num_layers_and_hidden(meta_params: dict[str, Any]) -> tuple[int, int]:
    layers = sum(1 for name in meta_params if name.startswith("layer"))
    return layers, meta_params["layer0"]["w_h"].shape[0]


def lstm_optimizer(meta_params: dict[str, Any], scale: float = 1.0,
                   preprocessing: str = "log_sign",
                   block_size: int = 0) -> optax.GradientTransformation:
    """The learned optimizer: updates u = scale · m(ρ(g), s; φ), coordinate by coordinate;
    `block_size` > 0 computes m by `blocked_network`."""
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"Unknown preprocessing {preprocessing!r}; choose one of {PREPROCESSING}.")
    in_size = meta_params["layer0"]["w_x"].shape[0]
    if in_size != INPUT_SIZE[preprocessing]:
        raise ValueError(f"These meta-parameters take {in_size} inputs per coordinate; "
                         f"preprocessing {preprocessing!r} gives {INPUT_SIZE[preprocessing]}.")
    layers, hidden = num_layers_and_hidden(meta_params)

    def init(params):
        zeros = lambda p: jnp.zeros((*jnp.shape(p), layers, hidden), jnp.result_type(p))  # noqa: E731
        return LSTMOptimizerState(h=jax.tree.map(zeros, params), c=jax.tree.map(zeros, params))

    def update_leaf(g, h, c):
        x = preprocess(jnp.reshape(g, (-1,)), preprocessing)
        args = (meta_params, x.astype(h.dtype), h.reshape(-1, layers, hidden),
                c.reshape(-1, layers, hidden))
        out, h2, c2 = blocked_network(*args, block_size) if block_size else network(*args)
        update = (scale * out).reshape(g.shape).astype(g.dtype)
        return update, h2.reshape(h.shape), c2.reshape(c.shape)

    def update(grads, state, params=None):
        del params
        treedef = jax.tree.structure(grads)
        per_leaf = [update_leaf(*leaf) for leaf in zip(treedef.flatten_up_to(grads),
                                                       treedef.flatten_up_to(state.h),
                                                       treedef.flatten_up_to(state.c))]
        updates, h, c = (treedef.unflatten([leaf[i] for leaf in per_leaf]) for i in range(3))
        return updates, LSTMOptimizerState(h=h, c=c)

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
