"""Meta-training: the truncated meta-gradient against finite differences, model selection,
resume, and a short meta-training that must help (4 devices and 2 processes:
tests/test_scale_out.py)."""

import dataclasses
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import metrics, workdirs
from learned_optimizers import evaluate, lstm, tasks, train


TINY = train.Config(hidden_size=4, unroll_length=3, horizon=6, meta_batch_size=2,
                    second_order=True)


def directional_check(config, eps=1e-6, first_step=3):
    """(⟨∇L, v⟩ by autodiff, central finite difference of L along v) for a random v, L the
    objective of the unroll from `first_step` (after one unroll from 0)."""
    family = tasks.quadratic_family()
    phi = lstm.init_meta_params(jax.random.PRNGKey(0), config.preprocessing, config.hidden_size,
                                output_init_scale=1.0)
    trajectories = train.fresh_trajectories(config, family, jax.random.PRNGKey(1))
    # start mid-horizon from a state the optimizer produced, as in truncated BPTT
    _, trajectories = train.truncated_meta_loss(config, family, phi, trajectories, 0, ())
    loss = jax.jit(lambda p: train.truncated_meta_loss(config, family, p, trajectories,
                                                       first_step, ())[0])
    leaves, treedef = jax.tree.flatten(phi)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    v = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    along = lambda s: jax.tree.map(lambda p, d: p + s * d, phi, v)  # noqa: E731
    grad = jax.jit(jax.grad(loss))(phi)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v)))
    numeric = (loss(along(eps)) - loss(along(-eps))) / (2 * eps)
    return float(analytic), float(numeric)


def test_truncated_meta_gradient_equals_finite_differences_in_float64():
    with jax.enable_x64(True):
        analytic, numeric = directional_check(TINY)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
        # dropping second derivatives changes the gradient: the flag is not a no-op
        first_order, _ = directional_check(dataclasses.replace(TINY, second_order=False))
        assert abs(first_order - numeric) > 1e-4 * abs(numeric)


def small_mlp_family(seed=0):
    """An MLP family on 40 random 3x3 images: the minibatch of each step matters."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (40, 3, 3, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 40).astype(np.int32)
    return tasks.mlp_family(images, labels, "mlp", batch_size=8)


def test_meta_objective_is_the_losses_after_every_update_of_the_unroll():
    """L_s(φ) = 1/K Σ_{t=s+1..s+K} f_t(θ_t), f_t on minibatch fold_in(key, t), against a Python
    loop of the optimizer's updates written out here (not `tasks.unroll`)."""
    config = train.Config(hidden_size=4, unroll_length=3, horizon=6, meta_batch_size=2,
                          preprocessing="log_sign", output_scale=0.1)
    family = small_mlp_family()
    phi = lstm.init_meta_params(jax.random.PRNGKey(0), "log_sign", 4, output_init_scale=1.0)
    start = train.fresh_trajectories(config, family, jax.random.PRNGKey(1))
    _, mid = train.truncated_meta_loss(config, family, phi, start, 0, family.data)
    got, end = train.truncated_meta_loss(config, family, phi, mid, 3, family.data)

    tx = train.make_optimizer(config, phi)
    per_task, per_task_losses = [], []
    for i in range(config.meta_batch_size):
        traj = jax.tree.map(lambda x: x[i], mid)
        params, opt_state, losses = traj.params, traj.opt_state, []
        for t in range(3, 6):
            grads = jax.grad(family.loss)(params, traj.task, jax.random.fold_in(traj.key, t),
                                          family.data)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(family.loss(params, traj.task, jax.random.fold_in(traj.key, t + 1),
                                      family.data))
        per_task.append(np.mean(losses))
        per_task_losses.append(losses)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.tree.map(lambda x: x[i],
                                                                              end.params))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(got), np.mean(per_task), rtol=1e-5)
    log_config = dataclasses.replace(config, meta_objective="log_loss")
    got_log, _ = train.truncated_meta_loss(log_config, family, phi, mid, 3, family.data)
    np.testing.assert_allclose(float(got_log), np.mean(np.log(per_task_losses)), rtol=1e-5)


def test_unrolls_of_a_horizon_sum_to_the_papers_objective():
    """The objectives of the T/K unrolls of a horizon average to 1/T Σ_{t=1..T} f(θ_t) of the
    learning curve: f(θ_T) in, f(θ_0) out (the off-by-one scored f(θ_0) .. f(θ_{T-1}))."""
    config = train.Config(hidden_size=4, unroll_length=2, horizon=6, meta_batch_size=3,
                          preprocessing="log_sign", output_scale=0.1)
    family = small_mlp_family()
    phi = lstm.init_meta_params(jax.random.PRNGKey(0), "log_sign", 4, output_init_scale=1.0)
    keys = jax.random.split(jax.random.PRNGKey(1), config.meta_batch_size)
    tx = train.make_optimizer(config, phi)
    trajectories = jax.vmap(lambda k: tasks.start(tx, family, k))(keys)
    objectives = []
    for s in range(0, config.horizon, config.unroll_length):
        loss, trajectories = train.truncated_meta_loss(config, family, phi, trajectories, s,
                                                       family.data)
        objectives.append(float(loss))
    curves = jax.vmap(lambda k: tasks.learning_curve(tx, family, k, config.horizon))(keys)
    np.testing.assert_allclose(np.mean(objectives), np.mean(curves[:, 1:]), rtol=1e-5)
    assert abs(np.mean(objectives) - np.mean(curves[:, :-1])) > 1e-3


@pytest.mark.parametrize("second_order,mixed", [(False, False), (True, False), (False, True)])
def test_one_task_at_a_time_gives_the_vmapped_meta_gradient(second_order, mixed):
    """task_batching="map" (the CPU default) against "vmap", which differentiates
    `truncated_meta_loss` itself: the same gradient, loss and trajectories (φ in float64, the
    MLP's parameters in float32), also on a mixture of two datasets (a branch per task)."""
    with jax.enable_x64(True):
        config = dataclasses.replace(TINY, preprocessing="log_sign", output_scale=0.1,
                                     meta_batch_size=3, second_order=second_order)
        family = small_mlp_family()
        if mixed:
            family = tasks.mixture([family, small_mlp_family(seed=1)])
        phi = lstm.init_meta_params(jax.random.PRNGKey(0), "log_sign", 4, output_init_scale=1.0)
        start = train.fresh_trajectories(config, family, jax.random.PRNGKey(1))
        results = {batching: jax.jit(lambda phi, traj, b=batching: train.truncated_meta_gradient(
            dataclasses.replace(config, task_batching=b), family, phi, traj, 3, family.data))(
                phi, start) for batching in ("map", "vmap")}
        assert float(optax.tree.norm(results["vmap"][0])) > 1e-3
        chex.assert_trees_all_close(results["map"], results["vmap"], rtol=1e-5, atol=1e-8)


def test_auto_task_batching_maps_tasks_of_many_parameters_on_cpu():
    def batch_of(num_params):
        return tasks.Trajectory(params={"w": jnp.zeros((2, num_params))}, opt_state=(), task=(),
                                key=jnp.zeros((2, 2), jnp.uint32))
    small, large = batch_of(train.MAP_MIN_COORDINATES - 1), batch_of(train.MAP_MIN_COORDINATES)
    assert jax.devices()[0].platform == "cpu"
    assert train.resolve_task_batching(TINY, small) == "vmap"
    assert train.resolve_task_batching(TINY, large) == "map"
    for explicit in ("vmap", "map"):
        config = dataclasses.replace(TINY, task_batching=explicit)
        assert train.resolve_task_batching(config, small) == explicit
        assert train.resolve_task_batching(config, large) == explicit


@pytest.mark.parametrize("second_order", [False, True])
def test_one_step_unroll_meta_gradient_is_nonzero_and_equals_finite_differences(second_order):
    """K = 1: L(φ) = f(θ_s + u(∇f(θ_s); φ)), so ∇L ≠ 0 (the old objective f(θ_s) gave exactly 0)
    and, ∇f(θ_s) not depending on φ, first and second order both equal finite differences."""
    with jax.enable_x64(True):
        config = dataclasses.replace(TINY, unroll_length=1, horizon=2, second_order=second_order)
        analytic, numeric = directional_check(config, first_step=1)
        assert abs(analytic) > 1e-3
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_pes_scores_particles_on_the_same_objective():
    """With σ → 0 both particles are φ: PES's mean loss is truncated BPTT's objective."""
    with jax.enable_x64(True):
        config, family, phi = pes_setup(pairs=2)
        config = dataclasses.replace(config, pes_sigma=1e-9)
        start = train.fresh_trajectories(config, family, jax.random.PRNGKey(1))
        zeros = jax.tree.map(lambda p: jnp.zeros((2,) + p.shape, p.dtype), phi)
        _, loss, _, _ = train.pes_gradient(config, family, phi, start, zeros, 0, (),
                                           jax.random.PRNGKey(2))
        expected, _ = train.truncated_meta_loss(config, family, phi, start, 0, ())
        np.testing.assert_allclose(float(loss), float(expected), rtol=1e-7)


def test_select_best_keeps_the_lowest_validation_loss():
    first, second = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    state = train.MetaTrainState(step=0, meta_params=first, meta_opt_state=(), trajectories=(),
                                 best_meta_params=first, best_validation_loss=jnp.inf)
    state = train.select_best(state, jnp.float32(2.0))
    state = train.select_best(state.replace(meta_params=second), jnp.float32(3.0))
    assert float(state.best_validation_loss) == 2.0
    np.testing.assert_array_equal(state.best_meta_params["w"], first["w"])
    state = train.select_best(state, jnp.float32(1.0))
    np.testing.assert_array_equal(state.best_meta_params["w"], second["w"])


SHORT = train.Config(meta_batch_size=16, num_steps=40, log_every=20, validate_every=20,
                     checkpoint_every=20, num_validation_tasks=16, meta_lr=3e-3, evaluate=False)


@pytest.mark.slow
def test_short_meta_training_beats_the_untrained_lstm_and_resumes_exactly(tmp_path):
    workdir = str(tmp_path / "run")
    straight = train.train_and_evaluate(SHORT, workdir)
    rows = metrics.read_metrics(workdir)
    # a crash after step 20: the last checkpoint and metrics are lost; the same command resumes
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(SHORT.num_steps)))
    resumed = train.train_and_evaluate(SHORT, workdir)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    without_rates = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_per_s")}  # noqa: E731
                                  for r in rows]
    assert without_rates(metrics.read_metrics(workdir)) == without_rates(rows)

    family = tasks.quadratic_family()
    _, test_keys = evaluate.eval_keys(0, 1, 32)
    untrained = lstm.init_meta_params(train.root_keys(SHORT.seed)[0], SHORT.preprocessing)
    loss_at_horizon = jax.jit(lambda phi: jax.vmap(lambda key: tasks.learning_curve(
        train.make_optimizer(SHORT, phi), family, key, SHORT.horizon)[-1])(test_keys).mean())
    trained_loss = loss_at_horizon(straight.best_meta_params)
    assert trained_loss < 0.25 * loss_at_horizon(untrained)
    saved, settings = lstm.load(os.path.join(workdir, train.META_PARAMS_FILE))
    assert settings == {"scale": SHORT.output_scale, "preprocessing": SHORT.preprocessing}
    np.testing.assert_allclose(loss_at_horizon(saved), trained_loss, rtol=1e-6)


def pes_setup(pairs):
    config = train.Config(hidden_size=2, num_layers=1, unroll_length=3, horizon=6,
                          meta_batch_size=2 * pairs, estimator="pes", pes_sigma=0.01)
    family = tasks.quadratic_family()
    phi = lstm.init_meta_params(jax.random.PRNGKey(0), config.preprocessing, config.hidden_size,
                                config.num_layers, output_init_scale=1.0)
    return config, family, phi


def test_pes_is_unbiased_through_the_truncation_where_truncated_bptt_is_not():
    """Over two unrolls of the same tasks, the mean PES estimate for the second unroll's loss
    matches its full gradient through both unrolls (float64, 2,048 antithetic pairs, a 35-parameter
    LSTM: sampling error ~ sqrt(35 / 2048) ≈ 0.13); truncated BPTT's gradient misses the first
    unroll's part."""
    pairs = 2048
    with jax.enable_x64(True):
        config, family, phi = pes_setup(pairs)
        start = train.fresh_trajectories(config, family, jax.random.PRNGKey(1))
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x[:pairs], start),
                                    jax.tree.map(lambda x: x[pairs:], start))
        zeros = jax.tree.map(lambda p: jnp.zeros((pairs,) + p.shape, p.dtype), phi)

        @jax.jit
        def pes_second_unroll(phi):
            first, second = jax.random.split(jax.random.PRNGKey(3))
            _, _, traj, sums = train.pes_gradient(config, family, phi, start, zeros, 0, (), first)
            return train.pes_gradient(config, family, phi, traj, sums, 3, (), second)[0]

        tbptt = dataclasses.replace(config, estimator="tbptt", meta_batch_size=pairs,
                                    second_order=True)
        tasks_once = jax.tree.map(lambda x: x[:pairs], start)

        def second_unroll_loss(phi_first, phi_second):
            _, traj = train.truncated_meta_loss(tbptt, family, phi_first, tasks_once, 0, ())
            return train.truncated_meta_loss(tbptt, family, phi_second, traj, 3, ())[0]

        flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa
        full = flat(jax.jit(jax.grad(lambda p: second_unroll_loss(p, p)))(phi))
        truncated = flat(jax.jit(jax.grad(
            lambda p: second_unroll_loss(jax.lax.stop_gradient(p), p)))(phi))
        estimate = flat(pes_second_unroll(phi))
        error = lambda g: float(jnp.linalg.norm(g - full) / jnp.linalg.norm(full))  # noqa: E731
        assert error(truncated) > 0.5  # the part truncation drops is large here
        assert error(estimate) < 0.3, (error(estimate), error(truncated))


def test_pes_meta_step_accumulates_perturbations_and_resets_them_with_new_tasks():
    """|ξ|² is about P·d·σ² after one unroll of a task, twice that after two, and back to one
    unroll's worth when the horizon ends and fresh tasks start."""
    config, family, phi = pes_setup(pairs=512)
    state = train.create_train_state(config, family, jax.random.PRNGKey(0))
    step = jax.jit(train.make_train_step(config, family))
    one_unroll = 512 * 35 * config.pes_sigma ** 2
    norms = []
    for _ in range(3):  # horizon 6 = 2 unrolls of 3: steps 0, 1 on one meta-batch, 2 on the next
        state, out = step(state, ())
        assert np.isfinite(float(out["meta_loss"]))
        norms.append(float(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(state.perturbation_sums))))
    np.testing.assert_allclose(np.array(norms) / one_unroll, [1, 2, 1], rtol=0.1)


@pytest.mark.slow
def test_max_minutes_stops_at_a_checkpoint_and_the_same_command_continues(tmp_path, caplog):
    config = dataclasses.replace(TINY, second_order=False, num_steps=4, checkpoint_every=2,
                                 log_every=1, validate_every=2, num_validation_tasks=2,
                                 num_test_tasks=2, eval_horizons=(6,))
    straight = train.train_and_evaluate(dataclasses.replace(config, evaluate=False),
                                        str(tmp_path / "straight"))
    timed = dataclasses.replace(config, max_minutes=1e-9)  # out of time at every checkpoint
    workdir = tmp_path / "timed"
    caplog.set_level("INFO")
    assert int(train.train_and_evaluate(timed, str(workdir)).step) == 2
    assert "Stopping after meta-step 2 of 4: --max_minutes=1e-09" in caplog.text
    assert not (workdir / evaluate.EVAL_FILE).exists(), "evaluated an unfinished run"
    # a run started before a flag existed resumes: its stored config lacks the key (= default);
    # so does one started before a retired flag was removed (its config.json holds the key)
    stored = workdirs.read_json(str(workdir / workdirs.CONFIG_FILE))
    del stored["meta_objective"]
    stored["block_size"] = 256
    (workdir / workdirs.CONFIG_FILE).write_text(json.dumps(stored))
    assert train.read_config(str(workdir)) == timed
    resumed = train.train_and_evaluate(timed, str(workdir))
    assert int(resumed.step) == 4 and (workdir / evaluate.EVAL_FILE).exists()
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    family = workdirs.read_json(str(workdir / evaluate.EVAL_FILE))["families"]["quadratic"]
    for name, curve in family["mean_curves"].items():  # the per-step curves behind the table
        assert len(curve) == 7
        np.testing.assert_allclose(curve[6], family["stats"][name]["6"]["mean"], rtol=1e-6)
    # continued to more meta-steps, the run keeps its evaluation and φ at 4 beside the new ones,
    # and never leaves an eval.json of another φ than meta_params.npz
    evaluated = {name: (workdir / name).read_bytes()
                 for name in (evaluate.EVAL_FILE, train.META_PARAMS_FILE)}
    longer = dataclasses.replace(timed, num_steps=8)
    assert int(train.train_and_evaluate(longer, str(workdir)).step) == 6
    assert not (workdir / evaluate.EVAL_FILE).exists()
    train.train_and_evaluate(longer, str(workdir))
    assert workdirs.read_json(str(workdir / evaluate.EVAL_FILE))["meta_steps"] == 8
    assert (workdir / "eval_4.json").read_bytes() == evaluated[evaluate.EVAL_FILE]
    assert (workdir / "meta_params_4.npz").read_bytes() == evaluated[train.META_PARAMS_FILE]
    with pytest.raises(ValueError, match="max_minutes must be >= 0"):
        dataclasses.replace(config, max_minutes=-1.0).validate()


CURRICULUM = dataclasses.replace(TINY, unroll_length=2, horizon=4, horizon_curriculum=(2, 6, 4),
                                 curriculum_stage_steps=3, second_order=False)


def test_curriculum_stages_number_meta_batches_on_and_start_each_stage_with_fresh_tasks():
    """Horizons 2, 6, 4 in unrolls of 2, 3 meta-steps per stage: three one-unroll meta-batches,
    one meta-batch of three unrolls, then meta-batches of two; the train step draws each
    meta-batch's tasks from its number."""
    expected = [(0, 0, 2), (1, 0, 2), (2, 0, 2), (3, 0, 6), (3, 1, 6), (3, 2, 6),
                (4, 0, 4), (4, 1, 4), (5, 0, 4), (5, 1, 4), (6, 0, 4)]
    schedule = jax.jit(lambda step: train.meta_batch_schedule(CURRICULUM, step))
    assert [tuple(map(int, schedule(step))) for step in range(len(expected))] == expected
    plain = [tuple(map(int, train.meta_batch_schedule(TINY, step))) for step in range(5)]
    assert plain == [(0, 0, 6), (0, 1, 6), (1, 0, 6), (1, 1, 6), (2, 0, 6)]  # T / K = 2

    family = tasks.quadratic_family()
    state = train.create_train_state(CURRICULUM, family, jax.random.PRNGKey(0))
    step = jax.jit(train.make_train_step(CURRICULUM, family))
    train_key = train.root_keys(CURRICULUM.seed)[1]
    for batch, _, horizon in expected[:8]:
        state, out = step(state, ())
        fresh = train.fresh_trajectories(CURRICULUM, family, jax.random.fold_in(train_key, batch))
        np.testing.assert_array_equal(state.trajectories.key, fresh.key)
        assert int(out["horizon"]) == horizon
    with pytest.raises(ValueError, match="multiple of every stage's number of unrolls"):
        dataclasses.replace(CURRICULUM, curriculum_stage_steps=4).validate()
    with pytest.raises(ValueError, match="multiple of unroll_length 2"):
        dataclasses.replace(CURRICULUM, horizon_curriculum=(2, 5)).validate()
