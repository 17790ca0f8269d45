"""The LSTM controller: log-probabilities, the REINFORCE gradient, the entropy bonus."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nas import controller as controller_lib
from nas.search_space import SearchSpace

SPACE = SearchSpace((("a", (0, 1)), ("b", ("x", "y", "z")), ("c", (1, 2, 3, 4))))
CONFIG = controller_lib.ControllerConfig(hidden_size=8, num_layers=2, learning_rate=0.05)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_log_prob(params, space, architecture):
    """The policy's log-probability and entropy of one architecture, one decision at a time."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    hidden = p["start"].shape[0]
    states = [(np.zeros(hidden), np.zeros(hidden)) for _ in p["lstm"]]
    x, log_prob, entropy, offset = p["start"], 0.0, 0.0, 0
    for t, (action, n) in enumerate(zip(architecture, space.num_choices)):
        for layer, cell in enumerate(p["lstm"]):
            h, c = states[layer]
            z = x @ cell["wx"] + h @ cell["wh"] + cell["b"]
            i, f, g, o = z[:hidden], z[hidden:2 * hidden], z[2 * hidden:3 * hidden], z[3 * hidden:]
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
            states[layer] = (h, c)
            x = h
        logits = x @ p["head_w"][t][:, :n] + p["head_b"][t][:n]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        log_prob += np.log(probs[action])
        entropy -= np.sum(probs * np.log(probs))
        x = p["embedding"][offset + action]
        offset += n
    return log_prob, entropy


def test_init_is_uniform_in_init_range():
    params = controller_lib.init_params(jax.random.PRNGKey(0), SPACE, CONFIG)
    leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
    assert np.abs(leaves).max() <= CONFIG.init_range
    assert np.abs(leaves).max() > 0.9 * CONFIG.init_range
    assert abs(leaves.mean()) < 0.01


def test_sampled_log_probs_equal_step_by_step_recomputation():
    ctrl = controller_lib.get_controller(SPACE, CONFIG)
    state = ctrl.init(jax.random.PRNGKey(1))
    params = jax.tree.map(lambda x: x * 20, state.params)  # sharper than init, still finite
    actions, log_probs, entropies = ctrl.sample(params, jax.random.PRNGKey(2), 16)
    actions = np.asarray(actions)
    assert all(SPACE.contains(a) for a in actions)
    assert len({tuple(a) for a in actions}) > 1
    for a, lp, ent in zip(actions, np.asarray(log_probs), np.asarray(entropies)):
        want_lp, want_ent = numpy_log_prob(params, SPACE, a)
        np.testing.assert_allclose(lp, want_lp, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ent, want_ent, rtol=1e-4, atol=1e-5)
    scored_lp, scored_ent = ctrl.log_prob(params, jnp.asarray(actions))
    np.testing.assert_allclose(scored_lp, log_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scored_ent, entropies, rtol=1e-5, atol=1e-6)


ONE = SearchSpace((("only", ("bad", "good")),))


ONE_CONFIG = controller_lib.ControllerConfig(hidden_size=4, num_layers=1, learning_rate=0.1,
                                            entropy_weight=0.0, baseline_decay=0.5,
                                            reward_transform="cubed")


@jax.jit
def _loss_grad(params, actions, advantages, entropy_weight):
    return jax.grad(controller_lib.reinforce_loss, has_aux=True)(
        params, actions, advantages, space=ONE, entropy_weight=entropy_weight)[0]


def _probabilities(ctrl, params):
    return np.exp(np.asarray(ctrl.log_prob(params, jnp.array([[0], [1]]))[0]))


def test_samples_follow_the_policy_distribution():
    ctrl = controller_lib.get_controller(ONE, ONE_CONFIG)
    params = ctrl.init(jax.random.PRNGKey(3)).params
    params["head_b"] = jnp.array([[1.0, -1.0]])
    p = _probabilities(ctrl, params)
    np.testing.assert_allclose(p, np.exp([numpy_log_prob(params, ONE, (c,))[0] for c in (0, 1)]),
                               rtol=1e-5)
    actions, _, _ = ctrl.sample(params, jax.random.PRNGKey(4), 4000)
    assert abs(np.mean(np.asarray(actions)[:, 0] == 0) - p[0]) < 0.04  # sd 0.007


def test_reinforce_gradient_matches_softmax_formula_and_moves_toward_better_choice():
    ctrl = controller_lib.get_controller(ONE, ONE_CONFIG)
    state = ctrl.init(jax.random.PRNGKey(5))
    actions = jnp.array([[0], [1], [1], [0]])
    rewards = jnp.array([0.0, 1.0, 1.0, 0.0])
    advantages = rewards - rewards.mean()  # step 0: the baseline is the batch mean
    grads = _loss_grad(state.params, actions, advantages, 0.0)
    p = _probabilities(ctrl, state.params)
    # d/db of -mean(A log softmax(z)_a) = -mean(A (onehot(a) - p))
    onehot = np.eye(2)[np.asarray(actions)[:, 0]]
    want = -np.mean(np.asarray(advantages)[:, None] * (onehot - p), axis=0)
    np.testing.assert_allclose(grads["head_b"][0], want, rtol=1e-5, atol=1e-7)

    for _ in range(5):
        state, _ = ctrl.update(state, actions, rewards)
    assert _probabilities(ctrl, state.params)[1] > p[1] + 0.1


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_entropy_bonus_sign(sign):
    ctrl = controller_lib.get_controller(ONE, ONE_CONFIG)
    params = {**ctrl.init(jax.random.PRNGKey(6)).params, "head_b": jnp.array([[0.5, -0.5]])}
    actions, no_advantage = jnp.array([[0], [1]]), jnp.zeros(2)
    entropy = lambda params: float(ctrl.log_prob(params, actions)[1][0])  # noqa: E731
    grads = _loss_grad(params, actions, no_advantage, sign)
    stepped = jax.tree.map(lambda w, g: w - 0.1 * g, params, grads)
    assert (entropy(stepped) - entropy(params)) * sign > 1e-3


def test_baseline_is_exponential_moving_average_of_transformed_rewards():
    ctrl = controller_lib.get_controller(ONE, ONE_CONFIG)  # decay 0.5, cubed rewards
    state = ctrl.init(jax.random.PRNGKey(7))
    actions = jnp.array([[0], [1]])
    state, m0 = ctrl.update(state, actions, jnp.array([0.5, 1.0]))
    first = (0.5 ** 3 + 1.0) / 2
    np.testing.assert_allclose(m0["baseline"], first, rtol=1e-6)
    np.testing.assert_allclose(state.baseline, first, rtol=1e-6)
    state, m1 = ctrl.update(state, actions, jnp.array([0.0, 0.0]))
    np.testing.assert_allclose(m1["baseline"], first, rtol=1e-6)
    np.testing.assert_allclose(state.baseline, 0.5 * first, rtol=1e-6)


def test_unknown_reward_transform_is_an_error():
    with pytest.raises(ValueError, match="reward_transform"):
        controller_lib.ControllerConfig(reward_transform="squared").validate()
