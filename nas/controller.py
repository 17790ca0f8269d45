"""The controller of Zoph & Le (2017): an autoregressive LSTM policy over architectures, trained
with REINFORCE.

The policy emits one decision at a time. At step t the input is the embedding of the choice made at
step t-1 (a learned start vector at t = 0); a stack of LSTM cells updates its state, and a head of
decision t maps the top hidden state to logits over that decision's choices:

    x_0 = s,  x_t = E[a_{t-1}],  h_t = LSTM(x_t, h_{t-1}),  z_t = (W_t h_t + b_t) / T,
    pi(a_t | a_<t) = softmax(c tanh(z_t))   (softmax(z_t) when c = 0),

with temperature T and tanh constant c as in ENAS (Pham et al. 2018: T = 5, c = 2.5).

Heads are stored padded to the largest number of choices with the padding masked out, so one
`lax.scan` unrolls every space. All weights start uniform in [-init_range, init_range].

REINFORCE with a moving-average baseline and an entropy bonus. For a batch of m architectures with
rewards r_k, transformed R_k = f(r_k) (`reward_transform`, e.g. r^3 as in the paper), the
advantage is A_k = (R_k - b) / s, and

    loss(theta) = -1/m sum_k A_k log pi_theta(a_k) - beta * 1/m sum_k H(pi_theta(. | a_k,<t)),

with H the sum over decisions of the per-step entropies along a_k. After each batch the baseline
and the scale move as b <- d b + (1 - d) mean_k R_k and v <- d v + (1 - d) mean_k (R_k - b)^2
(both start at the first batch's mean and mean square deviation). s = 1 (`normalize_advantages`
off: the paper) or (on) s = max(sqrt(v), rms_k(R_k - b) / 10) + 1e-8, which makes the update
invariant to the reward's scale: accuracy as a fraction or in percent gives the same search. The
floor, a tenth of the batch's own root-mean-square deviation from the baseline, binds only where
the moving spread is degenerate: a first batch of one architecture (or of equal rewards) sets
v = 0, and a controller that keeps proposing architectures of one reward decays v towards 0;
without it the next different reward would get an advantage of order 1e8 and fill Adam's second
moments for thousands of steps. With it |A_k| <= 10 sqrt(m).

Each batch is used for `updates_per_step` Adam steps. With `ppo_clip` = eps > 0 the steps after
the first are PPO's clipped objective (Schulman et al. 2017; Zoph et al. 2018 trained the NASNet
controller with PPO): with rho_k = pi_theta(a_k) / pi_old(a_k),

    loss(theta) = -1/m sum_k min(rho_k A_k, clip(rho_k, 1 - eps, 1 + eps) A_k) - beta * entropy,

whose gradient at theta = theta_old is REINFORCE's; with eps = 0 every step is the REINFORCE loss.

With `topk_size` = K > 0 the controller also imitates the best architectures found so far, as in
priority queue training (Abolafia et al. 2018, "Neural program synthesis with priority queue
training"): the state keeps the K distinct architectures of highest reward seen (the batch merged
in before the update), Q, and every step adds

    - lambda * 1/|Q| sum_{a in Q} log pi_theta(a)        (lambda = `topk_weight`)

to the loss: maximum likelihood on the best-so-far, which moves the policy toward what has
worked even when the moving baseline has caught up with it.

The LSTM cell is `common.lstm.lstm_cell`. The functions here are unjitted; `nas.train` jits the
sampling (`jit_sample`) and the update (`jit_train_step`) once per (space, config, mesh).
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

from common.config import check_choices, choice
from common.lstm import lstm_cell
from nas.search_space import SearchSpace

REWARD_TRANSFORMS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda r: r,
    "cubed": lambda r: r ** 3,
}
MASKED_LOGIT = -1e9
ADVANTAGE_BOUND = 10.0  # normalized: the scale is at least the batch's rms deviation / this


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """The controller and its REINFORCE update.

    The defaults were chosen on NAS-Bench-Macro's tuning seeds (`benchmarks/nas_macro.py
    --tune`). Zoph & Le's update is learning_rate 6e-4, entropy_weight 1e-4, reward_transform
    cubed, normalize_advantages off, temperature 1, tanh_constant 0, updates_per_step 1,
    topk_size 0.

    Attributes:
      hidden_size: Controller LSTM units per layer.
      num_layers: Controller LSTM layers.
      init_range: Controller weights start uniform in +-this.
      learning_rate: Controller Adam learning rate.
      entropy_weight: Weight of the policy-entropy bonus.
      baseline_decay: Decay of the reward moving-average baseline (and scale), in [0, 1).
      reward_transform: Transform of the reward in the policy gradient (cubed: Zoph & Le).
      normalize_advantages: Divide the advantage by the moving root-mean-square deviation of
        the reward from the baseline (scale-free rewards).
      temperature: Logits are divided by this before the tanh (ENAS: 5).
      tanh_constant: Logits are c * tanh(logits / temperature); 0 disables (ENAS: 2.5).
      updates_per_step: Adam steps on each batch of architectures.
      ppo_clip: PPO clip range eps of the steps after a batch's first; 0: plain REINFORCE.
      topk_size: Distinct best-so-far architectures the policy imitates (priority queue
        training); 0: none.
      topk_weight: Weight lambda of the imitation term (mean log-likelihood of the top k).
    """
    hidden_size: int = 35
    num_layers: int = 2
    init_range: float = 0.08
    learning_rate: float = 1e-2
    entropy_weight: float = 0.4
    baseline_decay: float = 0.8
    reward_transform: str = choice("identity", REWARD_TRANSFORMS)
    normalize_advantages: bool = True
    temperature: float = 5.0
    tanh_constant: float = 2.5
    updates_per_step: int = 3
    ppo_clip: float = 0.0
    topk_size: int = 10
    topk_weight: float = 1.0

    def validate(self) -> None:
        check_choices(self)
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("The controller needs hidden_size >= 1 and num_layers >= 1.")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}.")
        if self.temperature <= 0 or self.tanh_constant < 0 or self.ppo_clip < 0:
            raise ValueError("The controller needs temperature > 0, tanh_constant >= 0 and "
                             "ppo_clip >= 0.")
        if self.topk_size < 0 or self.topk_weight < 0:
            raise ValueError("The controller needs topk_size >= 0 and topk_weight >= 0.")
        if self.updates_per_step < 1:
            raise ValueError(f"updates_per_step must be >= 1, got {self.updates_per_step}.")


@flax.struct.dataclass
class ControllerState:
    step: jax.Array
    params: Any
    opt_state: Any
    baseline: jax.Array
    variance: jax.Array
    top_actions: jax.Array  # [K, D]: the K best distinct architectures seen
    top_rewards: jax.Array  # [K]: their raw rewards, -inf in slots not filled yet


def init_params(key: jax.Array, space: SearchSpace, config: ControllerConfig) -> dict:
    """Embeddings of every (decision, choice), the LSTM stack, and one head per decision."""
    h, n = config.hidden_size, space.num_choices
    shapes = {"start": (h,), "embedding": (sum(n), h),
              "head_w": (len(n), h, max(n)), "head_b": (len(n), max(n)),
              "lstm": [{"w_x": (h, 4 * h), "w_h": (h, 4 * h), "b": (4 * h,)}
                       for _ in range(config.num_layers)]}
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    sizes = [int(np.prod(s)) for s in leaves]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -config.init_range,
                              config.init_range)
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
    return jax.tree.unflatten(treedef, [x.reshape(s) for x, s in zip(pieces, leaves)])


def _space_tables(space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of each decision's rows in the embedding table, and the valid-choice mask."""
    n = np.array(space.num_choices)
    offsets = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int32)
    mask = np.arange(n.max())[None, :] < n[:, None]
    return offsets, mask


def policy_logits(raw: jax.Array, temperature: float, tanh_constant: float) -> jax.Array:
    """c tanh(z / T), or z / T when c = 0."""
    z = raw / temperature
    return tanh_constant * jnp.tanh(z) if tanh_constant > 0 else z


def unroll(params: dict, space: SearchSpace, batch_size: int, key: jax.Array | None = None,
           actions: jax.Array | None = None, temperature: float = 1.0,
           tanh_constant: float = 0.0):
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
        for layer, (h, c) in zip(params["lstm"], states):
            h, c = lstm_cell(layer, x, h, c)
            x = h
            new_states.append((h, c))
        logits = jnp.where(valid, policy_logits(x @ head_w + head_b, temperature, tanh_constant),
                           MASKED_LOGIT)
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
                   space: SearchSpace, entropy_weight: float,
                   old_log_probs: jax.Array | None = None, ppo_clip: float = 0.0,
                   temperature: float = 1.0, tanh_constant: float = 0.0,
                   top_actions: jax.Array | None = None, top_valid: jax.Array | None = None,
                   topk_weight: float = 0.0):
    """-mean(A_k log pi(a_k)) - beta mean(H_k), or with `old_log_probs` and `ppo_clip` > 0 the
    clipped surrogate -mean(min(rho_k A_k, clip(rho_k, 1 -+ eps) A_k)) - beta mean(H_k); with
    `top_actions` [K, D] also - lambda * (mean log pi over the `top_valid` ones). Also returns
    (log_probs, entropies) of `actions`."""
    m = actions.shape[0]
    if top_actions is not None:
        actions = jnp.concatenate([actions, top_actions.astype(actions.dtype)])
    _, log_probs, entropies = unroll(params, space, actions.shape[0], actions=actions,
                                     temperature=temperature, tanh_constant=tanh_constant)
    imitation = 0.0
    if top_actions is not None:
        top_log_probs = log_probs[m:]
        imitation = (jnp.sum(jnp.where(top_valid, top_log_probs, 0.0))
                     / jnp.maximum(jnp.sum(top_valid), 1))
    log_probs, entropies = log_probs[:m], entropies[:m]
    if old_log_probs is None or ppo_clip <= 0:
        surrogate = advantages * log_probs
    else:
        ratio = jnp.exp(log_probs - old_log_probs)
        surrogate = jnp.minimum(ratio * advantages,
                                jnp.clip(ratio, 1 - ppo_clip, 1 + ppo_clip) * advantages)
    loss = -jnp.mean(surrogate) - entropy_weight * jnp.mean(entropies) - topk_weight * imitation
    return loss, (log_probs, entropies)


def optimizer(config: ControllerConfig) -> optax.GradientTransformation:
    return optax.adam(config.learning_rate)


def init_state(key: jax.Array, space: SearchSpace, config: ControllerConfig) -> ControllerState:
    """Fresh parameters (`init_params`), Adam's state, step 0, baseline 0 and variance 1 (both
    replaced by the first batch's), an empty top-k (one unused slot when `topk_size` is 0:
    Orbax does not save empty arrays)."""
    params = init_params(key, space, config)
    slots = max(config.topk_size, 1)
    return ControllerState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=optimizer(config).init(params),
                           baseline=jnp.zeros((), jnp.float32),
                           variance=jnp.ones((), jnp.float32),
                           top_actions=jnp.zeros((slots, len(space)), jnp.int32),
                           top_rewards=jnp.full((slots,), -jnp.inf, jnp.float32))


def merge_top(top_actions: jax.Array, top_rewards: jax.Array, actions: jax.Array,
              rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The K = len(top_rewards) distinct architectures of highest reward among the top list and
    the batch (a repeat counts once); slots without one keep reward -inf."""
    candidates = jnp.concatenate([top_actions, actions.astype(top_actions.dtype)])
    candidate_rewards = jnp.concatenate([top_rewards, rewards.astype(top_rewards.dtype)])
    same = jnp.all(candidates[:, None, :] == candidates[None, :, :], axis=-1)
    repeat = jnp.any(jnp.tril(same, k=-1), axis=1)  # equal to an earlier candidate
    best, index = jax.lax.top_k(jnp.where(repeat, -jnp.inf, candidate_rewards),
                                top_rewards.shape[0])
    return candidates[index], best


def sample(params: dict, key: jax.Array, *, space: SearchSpace, batch_size: int,
           temperature: float = 1.0, tanh_constant: float = 0.0):
    """`batch_size` architectures [m, D] with their log-probabilities and entropies."""
    return unroll(params, space, batch_size, key=key, temperature=temperature,
                  tanh_constant=tanh_constant)


def log_prob(params: dict, actions: jax.Array, *, space: SearchSpace, temperature: float = 1.0,
             tanh_constant: float = 0.0):
    """(log_prob [m], entropy [m]) of the given architectures [m, D] under the policy."""
    return unroll(params, space, actions.shape[0], actions=actions, temperature=temperature,
                  tanh_constant=tanh_constant)[1:]


def advantages(transformed: jax.Array, state: ControllerState, config: ControllerConfig):
    """(A_k = (R_k - b) / s, b, v) for the transformed rewards R of a batch: the baseline b and
    mean square deviation v in use (at step 0, the batch's own), s = max(sqrt(v), rms_k(R_k - b)
    / 10) + 1e-8 when normalizing, else 1."""
    first = state.step == 0
    baseline = jnp.where(first, jnp.mean(transformed), state.baseline)
    batch_variance = jnp.mean((transformed - baseline) ** 2)
    variance = jnp.where(first, batch_variance, state.variance)
    scale = (jnp.maximum(jnp.sqrt(variance), jnp.sqrt(batch_variance) / ADVANTAGE_BOUND) + 1e-8
             if config.normalize_advantages else 1.0)
    return (transformed - baseline) / scale, baseline, variance


def update(state: ControllerState, actions: jax.Array, rewards: jax.Array, *,
           space: SearchSpace, config: ControllerConfig):
    """`updates_per_step` Adam steps on one batch of architectures and their (raw) rewards, then
    the moving baseline and scale; metrics of the batch under the policy that sampled it."""
    top_actions, top_rewards = state.top_actions, state.top_rewards
    imitation = {}
    if config.topk_size:
        top_actions, top_rewards = merge_top(top_actions, top_rewards, actions, rewards)
        imitation = dict(top_actions=top_actions, top_valid=jnp.isfinite(top_rewards),
                         topk_weight=config.topk_weight)
    transformed = REWARD_TRANSFORMS[config.reward_transform](rewards.astype(jnp.float32))
    adv, baseline, variance = advantages(transformed, state, config)
    policy = dict(temperature=config.temperature, tanh_constant=config.tanh_constant)
    old_log_probs, entropies = jax.lax.stop_gradient(log_prob(state.params, actions, space=space,
                                                              **policy))
    loss_fn = functools.partial(reinforce_loss, space=space, entropy_weight=config.entropy_weight,
                                ppo_clip=config.ppo_clip, **policy, **imitation)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    opt = optimizer(config)

    def step(carry, _):
        params, opt_state = carry
        (loss, _), grads = grad_fn(params, actions, adv, old_log_probs=old_log_probs)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, optax.tree.norm(grads))

    (params, opt_state), (losses, grad_norms) = jax.lax.scan(
        step, (state.params, state.opt_state), jnp.arange(config.updates_per_step))
    decay = config.baseline_decay
    new_baseline = decay * baseline + (1 - decay) * jnp.mean(transformed)
    new_variance = decay * variance + (1 - decay) * jnp.mean((transformed - baseline) ** 2)
    new_state = ControllerState(step=state.step + 1, params=params, opt_state=opt_state,
                                baseline=new_baseline, variance=new_variance,
                                top_actions=top_actions, top_rewards=top_rewards)
    return new_state, {"loss": losses[0], "baseline": baseline, "mean_reward": jnp.mean(rewards),
                       "log_prob": jnp.mean(old_log_probs), "entropy": jnp.mean(entropies),
                       "grad_norm": grad_norms[0]}
