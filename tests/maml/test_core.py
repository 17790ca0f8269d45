"""MAML's core against independent computations: hand SGD, finite differences, Python loops."""

import dataclasses

import chex
import jax.flatten_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import task_gradients
from maml import core, models, tasks


@pytest.fixture
def float64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def tiny_mlp_problem(dtype=jnp.float32, num_tasks=3):
    model = models.MLP(hidden=(6,))
    fast, slow = models.init_split(model, jax.random.PRNGKey(0), jnp.zeros((1, 1)))
    fast = jax.tree.map(lambda p: p.astype(dtype), fast)
    batch, _ = tasks.sinusoid_tasks(0, 0, num_tasks, 4, 5)
    batch = jax.tree.map(lambda a: jnp.asarray(a, dtype), batch)
    return model, fast, slow, batch


def hand_mlp(params, x):
    h = jnp.maximum(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"], 0)
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def test_adapt_one_step_equals_hand_sgd():
    _, fast, _, batch = tiny_mlp_problem()
    support = tasks.task_slice(batch, 0)["support"]
    loss = lambda p, b: jnp.mean((hand_mlp(p, b["x"]) - b["y"]) ** 2)  # noqa: E731
    adapted = core.adapt(fast, support, loss, 0.1, 1)
    # ∂/∂W of mean (h W + c − y)^2, written out for the head; the rest through jax.grad.
    h = jnp.maximum(support["x"] @ fast["dense_0"]["kernel"] + fast["dense_0"]["bias"], 0)
    residual = h @ fast["head"]["kernel"] + fast["head"]["bias"] - support["y"]
    head_kernel_grad = 2 * h.T @ residual / residual.size
    chex.assert_trees_all_close(adapted["head"]["kernel"],
                                fast["head"]["kernel"] - 0.1 * head_kernel_grad, rtol=1e-5)
    chex.assert_trees_all_close(adapted["head"]["bias"],
                                fast["head"]["bias"] - 0.1 * 2 * residual.mean(0), rtol=1e-5)
    grads = jax.grad(loss)(fast, support)
    chex.assert_trees_all_close(adapted, jax.tree.map(lambda p, g: p - 0.1 * g, fast, grads))
    two = core.adapt(fast, support, loss, 0.1, 2)
    chex.assert_trees_all_close(two, core.adapt(adapted, support, loss, 0.1, 1))


def post_adaptation_loss(fast, task, inner_lr, steps):
    loss = lambda p, b: jnp.mean((hand_mlp(p, b["x"]) - b["y"]) ** 2)  # noqa: E731
    return loss(core.adapt(fast, task["support"], loss, inner_lr, steps), task["query"])


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_meta_gradient_equals_finite_differences(float64, steps):
    model, fast, slow, batch = tiny_mlp_problem(jnp.float64, num_tasks=1)
    task = tasks.task_slice(batch, 0)
    learner = tasks.regression_learner(model)
    config = core.MetaConfig(steps=steps, lr=0.05)
    meta_params = core.init_meta_params(config, fast, slow)
    grads, _, _ = core.meta_gradient(meta_params, batch, jnp.ones(1), learner, config)
    flat, unravel = jax.flatten_util.ravel_pytree(fast)
    eps = 1e-6
    f = lambda v: post_adaptation_loss(unravel(v), task, 0.05, steps)  # noqa: E731
    fd = jax.jit(jax.vmap(lambda e: (f(flat + e) - f(flat - e)) / (2 * eps)))(
        eps * jnp.eye(flat.size))
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grads["fast"])[0], fd, rtol=1e-5,
                               atol=1e-8)
    first = core.meta_gradient(meta_params, batch, jnp.ones(1), learner,
                               dataclasses.replace(config, first_order=True))[0]
    assert not np.allclose(jax.flatten_util.ravel_pytree(first["fast"])[0], fd, rtol=1e-3)


def test_first_order_equals_query_gradient_at_adapted_params(float64):
    model, fast, slow, batch = tiny_mlp_problem(jnp.float64, num_tasks=1)
    task = tasks.task_slice(batch, 0)
    learner = tasks.regression_learner(model)
    config = core.MetaConfig(steps=2, lr=0.05, first_order=True)
    grads, _, _ = core.meta_gradient(core.init_meta_params(config, fast, slow), batch,
                                     jnp.ones(1), learner, config)
    loss = lambda p, b: jnp.mean((hand_mlp(p, b["x"]) - b["y"]) ** 2)  # noqa: E731
    adapted = core.adapt(fast, task["support"], loss, 0.05, 2)
    chex.assert_trees_all_close(grads["fast"], jax.grad(loss)(adapted, task["query"]),
                                rtol=1e-10)


def test_meta_sgd_and_per_step_rates(float64):
    model, fast, slow, batch = tiny_mlp_problem(jnp.float64, num_tasks=1)
    task = tasks.task_slice(batch, 0)
    learner = tasks.regression_learner(model)
    loss = lambda p, b: jnp.mean((hand_mlp(p, b["x"]) - b["y"]) ** 2)  # noqa: E731
    rates = jax.tree.map(lambda p: jnp.linspace(0.01, 0.1, p.size).reshape(p.shape), fast)
    g = jax.grad(loss)(fast, task["support"])
    chex.assert_trees_all_close(core.adapt(fast, task["support"], loss, rates, 1),
                                jax.tree.map(lambda p, a, gi: p - a * gi, fast, rates, g))
    # MAML++: α of step i applies at step i; the learned rates get the gradient of the query loss.
    config = core.MetaConfig(steps=2, lr=0.05, learn_lr="per_layer_per_step")
    meta_params = core.init_meta_params(config, fast, slow)
    meta_params["inner_lr"] = jax.tree.map(lambda a: a * jnp.array([1.0, 2.0]),
                                           meta_params["inner_lr"])
    theta1 = jax.tree.map(lambda p, gi: p - 0.05 * gi, fast, g)
    theta2 = jax.tree.map(lambda p, gi: p - 0.1 * gi, theta1, jax.grad(loss)(theta1,
                                                                               task["support"]))
    value, _ = core.task_objective(meta_params, task, jnp.array([0.0, 1.0]), learner, config)
    np.testing.assert_allclose(value, loss(theta2, task["query"]), rtol=1e-12)
    grads = core.meta_gradient(meta_params, batch, jnp.array([0.0, 1.0]), learner, config)[0]
    eps = 1e-6
    bumped = jax.tree.map(lambda x: x, meta_params)
    bumped["inner_lr"]["head"]["bias"] = meta_params["inner_lr"]["head"]["bias"].at[1].add(eps)
    lowered = jax.tree.map(lambda x: x, meta_params)
    lowered["inner_lr"]["head"]["bias"] = meta_params["inner_lr"]["head"]["bias"].at[1].add(-eps)
    weights = jnp.array([0.0, 1.0])
    fd = (core.task_objective(bumped, task, weights, learner, config)[0]
          - core.task_objective(lowered, task, weights, learner, config)[0]) / (2 * eps)
    np.testing.assert_allclose(grads["inner_lr"]["head"]["bias"][1], fd, rtol=1e-6)
    # A fixed α (plain MAML) receives no gradient.
    plain = core.MetaConfig(steps=1, lr=0.05)
    assert core.meta_gradient(core.init_meta_params(plain, fast, slow), batch, jnp.ones(1),
                              learner, plain)[0]["inner_lr"] == 0


def test_multi_step_weights():
    config = core.MetaConfig(steps=4, multi_step_loss=True, multi_step_anneal_steps=100)
    np.testing.assert_allclose(core.step_weights(config, 0), [0.25] * 4, rtol=1e-6)
    np.testing.assert_allclose(core.step_weights(config, 50), [0.125] * 3 + [0.625], rtol=1e-6)
    np.testing.assert_allclose(core.step_weights(config, 10**6), [0.0075] * 3 + [0.9775],
                               rtol=1e-5)
    np.testing.assert_allclose(core.step_weights(dataclasses.replace(
        config, multi_step_loss=False), 0), [0, 0, 0, 1])


def test_vmapped_meta_batch_equals_python_loop():
    model, fast, slow, batch = tiny_mlp_problem(num_tasks=4)
    learner = tasks.regression_learner(model)
    config = core.MetaConfig(steps=2, lr=0.05, task_batching="vmap",
                             learn_lr="per_parameter")
    meta_params = core.init_meta_params(config, fast, slow)
    grads, loss, _ = core.meta_gradient(meta_params, batch, jnp.ones(1), learner, config)
    one_task = jax.jit(jax.value_and_grad(
        lambda mp, t: core.task_objective(mp, t, jnp.ones(1), learner, config)[0]))
    per_task = [one_task(meta_params, tasks.task_slice(batch, t)) for t in range(4)]
    np.testing.assert_allclose(loss, np.mean([v for v, _ in per_task]), rtol=1e-6)
    chex.assert_trees_all_close(grads, jax.tree.map(lambda *g: sum(g) / 4,
                                                    *[g for _, g in per_task]), rtol=1e-5,
                                atol=1e-7)


def test_every_task_batching_and_conv_impl_gives_the_same_meta_gradient():
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 28, 28), np.uint8)
    batch = tasks.episodes(images, 0, 0, num_tasks=2, ways=3, shots=1, queries=2)
    # Two blocks keep the four compilations short; each has a stride-2 conv and batch norm.
    fast, slow = models.init_split(models.Conv4(3, filters=4, blocks=2), jax.random.PRNGKey(1),
                                   jnp.zeros((1, 28, 28, 1)))
    results = {}
    for impl, strategy in (("xla", "unrolled"), ("xla", "vmap"), ("patches", "map"),
                           ("patches", "vmap")):
        learner = tasks.classification_learner(
            models.Conv4(3, filters=4, blocks=2, conv_impl=impl))
        config = core.MetaConfig(steps=1, lr=0.4, task_batching=strategy)
        results[impl, strategy] = jax.jit(
            lambda mp, b, learner=learner, config=config: core.meta_gradient(
                mp, b, jnp.ones(1), learner, config))(
            core.init_meta_params(config, fast, slow), batch)
    reference = results["xla", "unrolled"]
    assert float(optax_norm(reference[0]["fast"])) > 1e-3
    for key, value in results.items():
        chex.assert_trees_all_close(value, reference, rtol=2e-4, atol=2e-6,
                                    custom_message=str(key))
    # "auto": the CPU default is the map over patch convolutions just checked
    assert task_gradients.resolve_task_batching("auto", "cpu") == "map"
    assert task_gradients.resolve_task_batching("auto", "gpu") == "vmap"
    assert task_gradients.resolve_task_batching("unrolled", "cpu") == "unrolled"


@pytest.mark.slow
def test_map_keeps_one_tasks_activations_in_memory():
    """The CPU default sums the tasks' gradients in a scan: the compiled step's temporary memory
    stays flat as the meta-batch grows, where vmap's grows with every task (as a differentiated
    `lax.map`'s would, storing each task's activations for its backward loop)."""
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 28, 28), np.uint8)
    model = models.Conv4(3, filters=4, blocks=2, conv_impl="patches")
    learner = tasks.classification_learner(model)
    fast, slow = models.init_split(model, jax.random.PRNGKey(1), jnp.zeros((1, 28, 28, 1)))

    def temp_bytes(strategy, num_tasks):
        batch = tasks.episodes(images, 0, 0, num_tasks=num_tasks, ways=3, shots=1, queries=2)
        config = core.MetaConfig(steps=2, lr=0.4, task_batching=strategy)
        step = jax.jit(lambda mp, b: core.meta_gradient(mp, b, jnp.ones(1), learner, config))
        compiled = step.lower(core.init_meta_params(config, fast, slow), batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("map", 16) < 1.5 * temp_bytes("map", 2)
    assert temp_bytes("vmap", 16) > 4 * temp_bytes("vmap", 2)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


def test_patch_conv_equals_lax_conv():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 9, 3))
    for stride in (1, 2):
        params = models.PatchConv(5, 3, stride).init(jax.random.PRNGKey(1), x)
        ours = jax.jit(models.PatchConv(5, 3, stride).apply)(params, x)
        ref = jax.lax.conv_general_dilated(x, params["params"]["kernel"], (stride, stride),
                                           "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_batch_norm_uses_batch_statistics_and_optional_support_rows():
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 2, 2, 3)) * 3 + 1
    norm = models.BatchStatNorm()
    params = norm.init(jax.random.PRNGKey(0), x)
    y = norm.apply(params, x)
    np.testing.assert_allclose(y.mean((0, 1, 2)), 0, atol=1e-5)
    ref = x[:2]
    expect = (x - ref.mean((0, 1, 2))) / np.sqrt(ref.var((0, 1, 2)) + 1e-3)
    np.testing.assert_allclose(norm.apply(params, x, 2), expect, rtol=1e-4, atol=1e-5)
    # With support statistics, a query's prediction does not depend on the other queries.
    model = models.Conv4(3, filters=4)
    learner = tasks.classification_learner(model, "support")
    fast, slow = models.init_split(model, jax.random.PRNGKey(1), jnp.zeros((1, 28, 28, 1)))
    images = np.random.default_rng(0).random((5, 28, 28, 1), np.float32)
    support = {"x": images[:3], "y": jnp.arange(3)}
    query_loss = jax.jit(learner.query_loss)
    full = query_loss(fast, slow, support, {"x": images[3:], "y": jnp.array([0, 1])})
    alone = query_loss(fast, slow, support, {"x": images[3:4], "y": jnp.array([0])})
    other = query_loss(fast, slow, support, {"x": images[4:], "y": jnp.array([1])})
    np.testing.assert_allclose(full[0], (alone[0] + other[0]) / 2, rtol=1e-5)


def conv4_problem(dtype=jnp.float64):
    """A 2-block Conv4 with non-zero batch-norm offsets, and one 3-way 2-shot episode."""
    model = models.Conv4(3, filters=4, blocks=2)
    fast, slow = models.init_split(model, jax.random.PRNGKey(2), jnp.zeros((1, 28, 28, 1)))
    slow = jax.tree.map(lambda o: jnp.linspace(-0.5, 0.5, o.size).reshape(o.shape), slow)
    fast, slow = jax.tree.map(lambda p: p.astype(dtype), (fast, slow))
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 28, 28), np.uint8)
    batch = jax.tree.map(lambda a: jnp.asarray(a, dtype) if a.dtype.kind == "f" else a,
                         tasks.episodes(images, 0, 0, num_tasks=1, ways=3, shots=2, queries=2))
    return model, fast, slow, batch


def test_conv4_inner_loop_leaves_batch_norm_offsets_and_meta_gradient_reaches_them(float64):
    model, fast, slow, batch = conv4_problem()
    assert sorted(slow) == ["norm_0", "norm_1"] and not any(k.startswith("norm") for k in fast)
    learner = tasks.classification_learner(model)
    task = tasks.task_slice(batch, 0)
    support, query = task["support"], task["query"]
    config = core.MetaConfig(steps=2, lr=0.4)
    meta_params = core.init_meta_params(config, fast, slow)
    # The support loss does depend on the offsets: adapting them would change them.
    merged = models.merge_params(fast, slow)
    full = jax.grad(lambda p: learner.support_loss(*models.split_params(p), support))(merged)
    assert all(float(jnp.abs(full[f"norm_{i}"]["offset"]).max()) > 1e-4 for i in range(2))
    # MAML's objective: θ_2 by two hand SGD steps on θ alone, scored with the original φ.
    theta = fast
    for _ in range(2):
        theta = jax.tree.map(lambda p, g: p - 0.4 * g, theta,
                             jax.grad(learner.support_loss)(theta, slow, support))
    value, _ = core.task_objective(meta_params, task, jnp.ones(1), learner, config)
    np.testing.assert_allclose(value, learner.query_loss(theta, slow, support, query)[0],
                               rtol=1e-10)
    # Had the inner loop adapted φ too, the objective would differ.
    both = merged
    for _ in range(2):
        grads = jax.grad(lambda p: learner.support_loss(*models.split_params(p), support))(both)
        both = jax.tree.map(lambda p, g: p - 0.4 * g, both, grads)
    assert abs(float(value) - float(learner.query_loss(*models.split_params(both), support,
                                                       query)[0])) > 1e-6
    # The meta-gradient reaches every offset, equal to finite differences of the objective.
    grads = core.meta_gradient(meta_params, batch, jnp.ones(1), learner, config)[0]["slow"]
    eps = 1e-6
    for name in ("norm_0", "norm_1"):
        assert float(jnp.abs(grads[name]["offset"]).min()) > 0, name
        for channel in (0, 3):
            def objective(delta, name=name, channel=channel):
                bumped = {**meta_params, "slow": {**meta_params["slow"], name: {
                    "offset": meta_params["slow"][name]["offset"].at[channel].add(delta)}}}
                return core.task_objective(bumped, task, jnp.ones(1), learner, config)[0]
            fd = (objective(eps) - objective(-eps)) / (2 * eps)
            np.testing.assert_allclose(grads[name]["offset"][channel], fd, rtol=1e-5,
                                       atol=1e-9)
