"""The controller of Zoph & Le (2017): an autoregressive LSTM policy over architectures, trained
with REINFORCE.

The policy emits one decision at a time. At step t the input is the embedding of the choice made at
step t-1 (a learned start vector at t = 0); a stack of LSTM cells updates its state, and a head of
decision t maps the top hidden state to logits over that decision's choices:

    x_0 = s,  x_t = E[a_{t-1}],  h_t = LSTM(x_t, h_{t-1}),  pi(a_t | a_<t) = softmax(W_t h_t + b_t).

Heads are stored padded to the largest number of choices with the padding masked out, so one
`lax.scan` unrolls every space. All weights start uniform in [-init_range, init_range].

REINFORCE with a moving-average baseline and an entropy bonus. For a batch of m architectures with
rewards r_k, transformed R_k = f(r_k) (`reward_transform`, e.g. r^3 as in the paper),

    loss(theta) = -1/m sum_k (R_k - b) log pi_theta(a_k) - beta * 1/m sum_k H(pi_theta(. | a_k,<t)),

with H the sum over decisions of the per-step entropies along a_k, and b updated after each step
as b <- d b + (1 - d) mean_k R_k (b starts at the first batch's mean). Adam minimises the loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nas.search_space import SearchSpace

REWARD_TRANSFORMS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda r: r,
    "cubed": lambda r: r ** 3,
}
MASKED_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    hidden_size: int = 35
    num_layers: int = 2
    init_range: float = 0.08
    learning_rate: float = 6e-4
    entropy_weight: float = 1e-4
    baseline_decay: float = 0.95
    reward_transform: str = "cubed"

    def validate(self) -> None:
        if self.reward_transform not in REWARD_TRANSFORMS:
            raise ValueError(f"Unknown reward_transform {self.reward_transform!r}; choose one of "
                             f"{', '.join(REWARD_TRANSFORMS)}.")
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("The controller needs hidden_size >= 1 and num_layers >= 1.")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}.")


@flax.struct.dataclass
class ControllerState:
    step: jax.Array
    params: Any
    opt_state: Any
    baseline: jax.Array


@functools.partial(jax.jit, static_argnums=(1, 2))
def init_params(key: jax.Array, space: SearchSpace, config: ControllerConfig) -> dict:
    """Embeddings of every (decision, choice), the LSTM stack, and one head per decision."""
    h, n = config.hidden_size, space.num_choices
    shapes = {"start": (h,), "embedding": (sum(n), h),
              "head_w": (len(n), h, max(n)), "head_b": (len(n), max(n)),
              "lstm": [{"wx": (h, 4 * h), "wh": (h, 4 * h), "b": (4 * h,)}
                       for _ in range(config.num_layers)]}
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    sizes = [int(np.prod(s)) for s in leaves]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -config.init_range,
                              config.init_range)
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
    return jax.tree.unflatten(treedef, [x.reshape(s) for x, s in zip(pieces, leaves)])


def lstm_cell(p: dict, x: jax.Array, state: tuple[jax.Array, jax.Array]):
    """i, f, g, o = split(x Wx + h Wh + b); c' = s(f) c + s(i) tanh(g); h' = s(o) tanh(c')."""
    h, c = state
    i, f, g, o = jnp.split(x @ p["wx"] + h @ p["wh"] + p["b"], 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, (h, c)


def _space_tables(space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of each decision's rows in the embedding table, and the valid-choice mask."""
    n = np.array(space.num_choices)
    offsets = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int32)
    mask = np.arange(n.max())[None, :] < n[:, None]
    return offsets, mask


def unroll(params: dict, space: SearchSpace, batch_size: int, key: jax.Array | None = None,
           actions: jax.Array | None = None):
    """Runs the policy over all decisions for a batch, sampling (`key`) or scoring (`actions`).

    Returns (actions [m, D] int32, log_prob [m], entropy [m]); log-probabilities and entropies are
    summed over decisions.
    """
    offsets, mask = _space_tables(space)
    num_decisions = len(space)
    if actions is None:
        step_keys = jax.random.split(key, num_decisions)
        forced = jnp.zeros((num_decisions, batch_size), jnp.int32)
    else:
        step_keys = jnp.zeros((num_decisions, 2), jnp.uint32)
        forced = jnp.asarray(actions, jnp.int32).T
    hidden = params["start"].shape[0]
    zeros = jnp.zeros((batch_size, hidden))
    carry0 = (jnp.broadcast_to(params["start"], (batch_size, hidden)),
              [(zeros, zeros) for _ in params["lstm"]])

    def step(carry, xs):
        x, states = carry
        head_w, head_b, valid, offset, step_key, forced_action = xs
        new_states = []
        for layer, state in zip(params["lstm"], states):
            x, state = lstm_cell(layer, x, state)
            new_states.append(state)
        logits = jnp.where(valid, x @ head_w + head_b, MASKED_LOGIT)
        log_p = jax.nn.log_softmax(logits)
        if actions is None:
            action = jax.random.categorical(step_key, logits).astype(jnp.int32)
        else:
            action = forced_action
        chosen = jnp.take_along_axis(log_p, action[:, None], axis=1)[:, 0]
        entropy = -jnp.sum(jnp.where(valid, jnp.exp(log_p) * log_p, 0.0), axis=-1)
        next_x = params["embedding"][offset + action]
        return (next_x, new_states), (action, chosen, entropy)

    xs = (params["head_w"], params["head_b"], jnp.asarray(mask), jnp.asarray(offsets),
          step_keys, forced)
    _, (acts, log_probs, entropies) = jax.lax.scan(step, carry0, xs)
    return acts.T, log_probs.sum(0), entropies.sum(0)


def reinforce_loss(params: dict, actions: jax.Array, advantages: jax.Array, *,
                   space: SearchSpace, entropy_weight: float):
    """-mean(A_k log pi(a_k)) - beta mean(H_k); also returns (log_probs, entropies)."""
    _, log_probs, entropies = unroll(params, space, actions.shape[0], actions=actions)
    loss = -jnp.mean(advantages * log_probs) - entropy_weight * jnp.mean(entropies)
    return loss, (log_probs, entropies)


class Controller:
    """The policy's jitted functions for one (space, config); build with `get_controller`."""

    def __init__(self, space: SearchSpace, config: ControllerConfig):
        config.validate()
        self.space, self.config = space, config
        self.optimizer = optax.adam(config.learning_rate)
        self.sample = jax.jit(self._sample, static_argnums=2)
        self.update = jax.jit(self._update)
        self.log_prob = jax.jit(lambda params, actions: unroll(
            params, space, actions.shape[0], actions=actions)[1:])

    def init(self, key: jax.Array) -> ControllerState:
        params = init_params(key, self.space, self.config)
        return ControllerState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=self.optimizer.init(params),
                               baseline=jnp.zeros((), jnp.float32))

    def _sample(self, params, key, batch_size: int):
        """`batch_size` architectures [m, D] with their log-probabilities and entropies."""
        return unroll(params, self.space, batch_size, key=key)

    def _update(self, state: ControllerState, actions: jax.Array, rewards: jax.Array):
        """One REINFORCE step on a batch of architectures and their (raw) rewards."""
        transformed = REWARD_TRANSFORMS[self.config.reward_transform](rewards.astype(jnp.float32))
        baseline = jnp.where(state.step == 0, jnp.mean(transformed), state.baseline)
        advantages = transformed - baseline
        loss_fn = functools.partial(reinforce_loss, space=self.space,
                                    entropy_weight=self.config.entropy_weight)
        (loss, (log_probs, entropies)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, actions, advantages)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        decay = self.config.baseline_decay
        new_state = ControllerState(
            step=state.step + 1, params=optax.apply_updates(state.params, updates),
            opt_state=opt_state, baseline=decay * baseline + (1 - decay) * jnp.mean(transformed))
        return new_state, {"loss": loss, "baseline": baseline, "mean_reward": jnp.mean(rewards),
                           "log_prob": jnp.mean(log_probs), "entropy": jnp.mean(entropies),
                           "grad_norm": optax.tree.norm(grads)}


@functools.lru_cache(maxsize=32)
def get_controller(space: SearchSpace, config: ControllerConfig) -> Controller:
    """The controller of (space, config), compiled once per process."""
    return Controller(space, config)
