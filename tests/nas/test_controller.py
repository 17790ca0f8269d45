"""The LSTM controller: log-probabilities, the REINFORCE gradient, the entropy bonus."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import parallel
from nas import controller as controller_lib
from nas import train
from nas.search_space import SearchSpace

SPACE = SearchSpace((("a", (0, 1)), ("b", ("x", "y", "z")), ("c", (1, 2, 3, 4))))
CONFIG = controller_lib.ControllerConfig(hidden_size=8, num_layers=2, learning_rate=0.05)


class Controller:
    """The controller's functions for one (space, config), the update jitted as the search
    jits it."""

    def __init__(self, space, config):
        self.space, self.config = space, config
        self.train_step = train.jit_train_step(config, space, parallel.make_mesh())

    def init(self, key):
        return controller_lib.init_state(key, self.space, self.config)

    def sample(self, params, key, batch_size):
        return controller_lib.sample(params, key, space=self.space, batch_size=batch_size,
                                     temperature=self.config.temperature,
                                     tanh_constant=self.config.tanh_constant)

    def log_prob(self, params, actions):
        return controller_lib.log_prob(params, actions, space=self.space,
                                       temperature=self.config.temperature,
                                       tanh_constant=self.config.tanh_constant)

    def update(self, state, actions, rewards):
        return self.train_step(state, (actions, rewards))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_log_prob(params, space, architecture, temperature=1.0, tanh_constant=0.0):
    """The policy's log-probability and entropy of one architecture, one decision at a time."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    hidden = p["start"].shape[0]
    states = [(np.zeros(hidden), np.zeros(hidden)) for _ in p["lstm"]]
    x, log_prob, entropy, offset = p["start"], 0.0, 0.0, 0
    for t, (action, n) in enumerate(zip(architecture, space.num_choices)):
        for layer, cell in enumerate(p["lstm"]):
            h, c = states[layer]
            z = x @ cell["w_x"] + h @ cell["w_h"] + cell["b"]
            i, f, g, o = z[:hidden], z[hidden:2 * hidden], z[2 * hidden:3 * hidden], z[3 * hidden:]
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
            states[layer] = (h, c)
            x = h
        logits = (x @ p["head_w"][t][:, :n] + p["head_b"][t][:n]) / temperature
        if tanh_constant:
            logits = tanh_constant * np.tanh(logits)
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


@pytest.mark.parametrize("temperature,tanh_constant", [(1.0, 0.0), (5.0, 2.5)])
def test_sampled_log_probs_equal_step_by_step_recomputation(temperature, tanh_constant):
    ctrl = Controller(SPACE, CONFIG)
    state = ctrl.init(jax.random.PRNGKey(1))
    params = jax.tree.map(lambda x: x * 20, state.params)  # sharper than init, still finite
    policy = dict(temperature=temperature, tanh_constant=tanh_constant)
    actions, log_probs, entropies = controller_lib.sample(
        params, jax.random.PRNGKey(2), space=SPACE, batch_size=16, **policy)
    actions = np.asarray(actions)
    assert all(SPACE.contains(a) for a in actions)
    assert len({tuple(a) for a in actions}) > 1
    for a, lp, ent in zip(actions, np.asarray(log_probs), np.asarray(entropies)):
        want_lp, want_ent = numpy_log_prob(params, SPACE, a, **policy)
        np.testing.assert_allclose(lp, want_lp, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ent, want_ent, rtol=1e-4, atol=1e-5)
    scored_lp, scored_ent = controller_lib.log_prob(params, jnp.asarray(actions), space=SPACE,
                                                    **policy)
    np.testing.assert_allclose(scored_lp, log_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scored_ent, entropies, rtol=1e-5, atol=1e-6)


ONE = SearchSpace((("only", ("bad", "good")),))


ONE_CONFIG = controller_lib.ControllerConfig(hidden_size=4, num_layers=1, learning_rate=0.1,
                                            entropy_weight=0.0, baseline_decay=0.5,
                                            reward_transform="cubed", normalize_advantages=False,
                                            temperature=1.0, tanh_constant=0.0,
                                            updates_per_step=1, topk_size=0)


@jax.jit
def _loss_grad(params, actions, advantages, entropy_weight):
    return jax.grad(controller_lib.reinforce_loss, has_aux=True)(
        params, actions, advantages, space=ONE, entropy_weight=entropy_weight)[0]


def _probabilities(ctrl, params):
    return np.exp(np.asarray(ctrl.log_prob(params, jnp.array([[0], [1]]))[0]))


def test_samples_follow_the_policy_distribution():
    ctrl = Controller(ONE, ONE_CONFIG)
    params = ctrl.init(jax.random.PRNGKey(3)).params
    params["head_b"] = jnp.array([[1.0, -1.0]])
    p = _probabilities(ctrl, params)
    np.testing.assert_allclose(p, np.exp([numpy_log_prob(params, ONE, (c,))[0] for c in (0, 1)]),
                               rtol=1e-5)
    actions, _, _ = ctrl.sample(params, jax.random.PRNGKey(4), 4000)
    assert abs(np.mean(np.asarray(actions)[:, 0] == 0) - p[0]) < 0.04  # sd 0.007


def test_reinforce_gradient_matches_softmax_formula_and_moves_toward_better_choice():
    ctrl = Controller(ONE, ONE_CONFIG)
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
    ctrl = Controller(ONE, ONE_CONFIG)
    params = {**ctrl.init(jax.random.PRNGKey(6)).params, "head_b": jnp.array([[0.5, -0.5]])}
    actions, no_advantage = jnp.array([[0], [1]]), jnp.zeros(2)
    entropy = lambda params: float(ctrl.log_prob(params, actions)[1][0])  # noqa: E731
    grads = _loss_grad(params, actions, no_advantage, sign)
    stepped = jax.tree.map(lambda w, g: w - 0.1 * g, params, grads)
    assert (entropy(stepped) - entropy(params)) * sign > 1e-3


def test_baseline_is_exponential_moving_average_of_transformed_rewards():
    ctrl = Controller(ONE, ONE_CONFIG)  # decay 0.5, cubed rewards
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


THREE = SearchSpace((("only", ("a", "b", "c")),))


@pytest.mark.parametrize("config", [
    controller_lib.ControllerConfig(hidden_size=4, num_layers=1),  # the defaults
    ONE_CONFIG,  # the paper's update: cubed rewards, no normalisation, one step
], ids=["defaults", "paper"])
def test_update_moves_probability_toward_above_baseline_and_away_from_below(config):
    """Rewards all positive, 0.90 for `a` and 0.95 for `b`, `c` unsampled: against the baseline
    (the batch mean at the first step) `a` is below and loses probability, `b` gains. Without
    the baseline every sampled choice would gain at the expense of `c`, `a` included."""
    ctrl = Controller(THREE, config)
    state = ctrl.init(jax.random.PRNGKey(8))
    choices = jnp.array([[0], [1], [2]])
    before = np.exp(np.asarray(ctrl.log_prob(state.params, choices)[0]))
    state, _ = ctrl.update(state, jnp.array([[0], [1]]), jnp.array([0.90, 0.95]))
    after = np.exp(np.asarray(ctrl.log_prob(state.params, choices)[0]))
    assert after[0] < before[0] - 1e-4 and after[1] > before[1] + 1e-4, (before, after)
    # a later batch judged against the moving baseline (now between 0.90 and 0.95): `b` at
    # 0.93, above it, gains
    state, metrics = ctrl.update(state, jnp.array([[1], [1]]), jnp.array([0.93, 0.93]))
    transform = controller_lib.REWARD_TRANSFORMS[config.reward_transform]
    assert float(transform(0.90)) < float(metrics["baseline"]) < float(transform(0.93))
    assert np.exp(float(ctrl.log_prob(state.params, choices)[0][1])) > after[1]


def test_normalized_update_is_invariant_to_the_reward_scale():
    """Accuracy as a fraction or in percent: the same parameters after the same batches."""
    config = controller_lib.ControllerConfig(hidden_size=4, num_layers=1,
                                             reward_transform="identity")
    ctrl = Controller(SPACE, config)
    states = [ctrl.init(jax.random.PRNGKey(9))] * 2
    rng = np.random.default_rng(0)
    for _ in range(3):
        actions = jnp.asarray(np.stack([rng.integers(n, size=6) for n in SPACE.num_choices], 1))
        rewards = rng.uniform(0.5, 0.9, 6)
        states = [ctrl.update(state, actions, jnp.asarray(scale * rewards))[0]
                  for state, scale in zip(states, (1.0, 100.0))]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6),
                 states[0].params, states[1].params)


def test_normalized_advantage_is_bounded_where_the_moving_spread_is_zero():
    """A first batch of one architecture leaves v = 0: the next different reward's advantage is
    -10 (the scale floored at a tenth of the batch's deviation), not -0.08 / 1e-8, and the
    controller's gradient stays of order one; once v > 0 the advantage is (R - b) / sqrt(v)."""
    config = controller_lib.ControllerConfig(hidden_size=4, num_layers=1,
                                             reward_transform="identity")
    ctrl = Controller(SPACE, config)
    actions = jnp.array([[1, 2, 0]])
    state, _ = ctrl.update(ctrl.init(jax.random.PRNGKey(11)), actions, jnp.array([0.25]))
    assert float(state.variance) == 0.0 and float(state.baseline) == pytest.approx(0.25)
    adv = controller_lib.advantages(jnp.array([0.17]), state, config)[0]
    np.testing.assert_allclose(adv, [-controller_lib.ADVANTAGE_BOUND], rtol=1e-5)
    _, step_metrics = ctrl.update(state, actions, jnp.array([0.17]))
    assert 0 < float(step_metrics["grad_norm"]) < 100
    spread = state.replace(variance=jnp.float32(0.04))
    np.testing.assert_allclose(controller_lib.advantages(jnp.array([0.17]), spread, config)[0],
                               [(0.17 - 0.25) / 0.2], rtol=1e-5)


def test_ppo_steps_are_clipped_and_the_first_equals_reinforce():
    """Gradient of the clipped surrogate: REINFORCE's at rho = 1, zero for a positive advantage
    once rho > 1 + eps (and for a negative one once rho < 1 - eps)."""
    ctrl = Controller(ONE, ONE_CONFIG)
    params = {**ctrl.init(jax.random.PRNGKey(10)).params, "head_b": jnp.array([[0.3, -0.2]])}
    actions = jnp.array([[0], [1]])
    log_probs = ctrl.log_prob(params, actions)[0]

    def grad(old, advantages, clip):
        return jax.grad(controller_lib.reinforce_loss, has_aux=True)(
            params, actions, jnp.asarray(advantages), space=ONE, entropy_weight=0.0,
            old_log_probs=old, ppo_clip=clip)[0]["head_b"]

    reinforce = grad(None, [1.0, -1.0], 0.0)
    np.testing.assert_allclose(grad(log_probs, [1.0, -1.0], 0.2), reinforce, rtol=1e-5)
    np.testing.assert_allclose(grad(log_probs - 0.5, [1.0, 1.0], 0.2), 0.0)  # rho = e^0.5
    np.testing.assert_allclose(grad(log_probs + 0.5, [-1.0, -1.0], 0.2), 0.0)  # rho = e^-0.5
    assert np.abs(grad(log_probs + 0.5, [1.0, 1.0], 0.2)).max() > 1e-3  # rho < 1 + eps: kept


def test_merge_top_keeps_the_best_distinct_architectures():
    """Against a Python dedupe-and-sort: a batch repeating a kept architecture and itself, a new
    best, and slots left empty (-inf) until enough distinct ones are seen."""
    top_actions = jnp.array([[1, 2, 3], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    top_rewards = jnp.array([0.7, -jnp.inf, -jnp.inf, -jnp.inf])
    batch = [((1, 2, 3), 0.7), ((0, 1, 2), 0.9), ((0, 1, 2), 0.9), ((2, 2, 2), 0.1)]
    actions, rewards = controller_lib.merge_top(
        top_actions, top_rewards, jnp.array([a for a, _ in batch]),
        jnp.array([r for _, r in batch]))
    seen = dict([((1, 2, 3), 0.7)] + batch)
    want = sorted(seen.items(), key=lambda item: -item[1])
    assert [tuple(int(x) for x in a) for a in np.asarray(actions)[:3]] == [a for a, _ in want]
    np.testing.assert_allclose(np.asarray(rewards)[:3], [r for _, r in want])
    assert np.isneginf(np.asarray(rewards)[3])
    # a full list: a worse newcomer stays out, a better one displaces the worst
    actions, rewards = controller_lib.merge_top(actions, rewards, jnp.array([[2, 0, 0], [2, 1, 0]]),
                                                jnp.array([0.05, 0.8]))
    assert [tuple(int(x) for x in a) for a in np.asarray(actions)] == [
        (0, 1, 2), (2, 1, 0), (1, 2, 3), (2, 2, 2)]


def test_imitation_term_is_the_mean_log_likelihood_of_the_valid_top_k():
    params = jax.tree.map(lambda x: 10 * x, controller_lib.init_params(jax.random.PRNGKey(11),
                                                                        SPACE, CONFIG))
    actions, advantages = jnp.array([[0, 1, 2], [1, 0, 3]]), jnp.array([0.5, -0.5])
    top = jnp.array([[1, 2, 0], [0, 0, 1], [1, 1, 1]])
    valid = jnp.array([True, True, False])
    loss = lambda **kw: float(controller_lib.reinforce_loss(  # noqa: E731
        params, actions, advantages, space=SPACE, entropy_weight=0.1, **kw)[0])
    top_log_probs = np.asarray(controller_lib.log_prob(params, top, space=SPACE)[0], np.float64)
    want = loss() - 0.7 * top_log_probs[:2].mean()
    np.testing.assert_allclose(loss(top_actions=top, top_valid=valid, topk_weight=0.7), want,
                               rtol=1e-5)
    np.testing.assert_allclose(  # an empty slot's architecture does not count
        loss(top_actions=top.at[2].set(jnp.array([0, 2, 3])), top_valid=valid, topk_weight=0.7),
        want, rtol=1e-5)


def test_imitation_moves_the_policy_toward_the_best_so_far():
    """The same batches with and without imitating the top 1: the best architecture of the
    first batch, never sampled again, keeps more probability with the imitation term."""
    def best_probability(topk_size):
        config = controller_lib.ControllerConfig(hidden_size=4, num_layers=1, entropy_weight=0.0,
                                                 learning_rate=0.05, temperature=1.0,
                                                 tanh_constant=0.0, topk_size=topk_size,
                                                 topk_weight=1.0)
        ctrl = Controller(THREE, config)
        state = ctrl.init(jax.random.PRNGKey(12))
        state, _ = ctrl.update(state, jnp.array([[0], [1]]), jnp.array([0.2, 0.9]))
        for reward in (0.5, 0.6, 0.7):
            state, _ = ctrl.update(state, jnp.array([[2], [0]]), jnp.array([reward, 0.1]))
        probability = np.exp(float(ctrl.log_prob(state.params, jnp.array([[1]]))[0][0]))
        return probability, np.asarray(state.top_actions)

    without, _ = best_probability(0)
    with_imitation, top = best_probability(1)
    assert top.tolist() == [[1]]
    assert with_imitation > without + 0.05, (without, with_imitation)
