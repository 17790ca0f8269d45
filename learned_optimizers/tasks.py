"""Task families for learning to optimize, and training one task with any optax optimizer.

A task family samples tasks: `family.sample(key) -> (θ₀, task)`, and defines the loss
`family.loss(θ, task, key, data)` of parameters θ on the minibatch drawn with `key`. `data` holds
arrays shared by every task of the family (a dataset's images), passed as an argument rather than
closed over so that compiled functions do not embed them as constants.

* quadratic -- f(θ) = ||Wθ − y||², θ ∈ R¹⁰, W and y i.i.d. N(0, 1), θ₀ ~ N(0, 0.01²) (the paper).
* mlp       -- an MLP classifier (one hidden layer of 20 sigmoid units) on minibatches of 128
               images of a dataset split (optionally average-pooled), cross-entropy loss; the task
               is an initialisation.
  Transfer targets of the paper: mlp_40 (40 hidden units), mlp_2layer (two hidden layers of 20),
  mlp_relu (ReLU instead of sigmoid).
* `randomly_scaled(family, r)` -- any family with its parameters rescaled per coordinate (Lv et
  al., 2017), a meta-training remedy.
* `mixture(families)` -- a task of one of several families (an MLP on several datasets), drawn
  uniformly: meta-training over a mixture of datasets, another remedy.

`unroll(tx, family, ...)` trains a task for a number of steps with an optax transformation inside
`lax.scan` and returns the loss f(θ_t) at every step, evaluated before the step's update: the one
loop shared by meta-training, the baselines and evaluation. `scored_unroll` returns instead the
losses after each update, f(θ_{s+1}) .. f(θ_{s+K}) for an unroll of K steps from step s: the terms
of the meta-objective, every update credited.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import data as common_data

QUADRATIC_DIM = 10
MLP_VARIANTS = {  # name -> (hidden layer sizes, activation)
    "mlp": ((20,), "sigmoid"),
    "mlp_40": ((40,), "sigmoid"),
    "mlp_2layer": ((20, 20), "sigmoid"),
    "mlp_relu": ((20,), "relu"),
}
FAMILIES = ("quadratic",) + tuple(MLP_VARIANTS)
ACTIVATIONS = {"sigmoid": nn.sigmoid, "relu": nn.relu}


@dataclasses.dataclass(frozen=True)
class TaskFamily:
    name: str
    sample: Callable[[jax.Array], tuple[Any, Any]]  # key -> (θ₀, task)
    loss: Callable[[Any, Any, jax.Array, Any], jax.Array]  # (θ, task, key, data) -> f
    data: Any = ()


# --------------------------------------------------------------------------------------------
# Quadratics


def quadratic_family(dim: int = QUADRATIC_DIM, init_scale: float = 0.01) -> TaskFamily:
    def sample(key):
        kw, ky, kt = jax.random.split(key, 3)
        task = (jax.random.normal(kw, (dim, dim)), jax.random.normal(ky, (dim,)))
        return init_scale * jax.random.normal(kt, (dim,)), task

    def loss(theta, task, key, data):
        del key, data
        w, y = task
        return jnp.sum((w @ theta - y) ** 2)

    return TaskFamily("quadratic", sample, loss)


# --------------------------------------------------------------------------------------------
# MLP classifiers


class MLP(nn.Module):
    hidden: Sequence[int]
    activation: str = "sigmoid"
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = ACTIVATIONS[self.activation](nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def pooled_features(images: np.ndarray, pool: int = 1) -> np.ndarray:
    """uint8 [N, H, W, C] images as float32 [N, (H/pool)(W/pool)C] in [0, 1], pool×pool averaged."""
    n, height, width, channels = images.shape
    if height % pool or width % pool:
        raise ValueError(f"pool {pool} does not divide the image size {height}x{width}.")
    x = images.astype(np.float32).reshape(n, height // pool, pool, width // pool, pool, channels)
    return (x.mean(axis=(2, 4)) / 255.0).reshape(n, -1)


def mlp_family(images: np.ndarray, labels: np.ndarray, variant: str = "mlp",
               batch_size: int = 128, pool: int = 1) -> TaskFamily:
    """Classifier tasks on (images uint8 [N, H, W, C], labels [N]); a task is an initialisation.

    `pool` > 1 averages pool×pool pixel blocks first: the LSTM's cost is linear in the number of
    parameters, and 28x28 inputs make meta-training too slow for a CPU.
    """
    if variant not in MLP_VARIANTS:
        raise ValueError(f"Unknown MLP variant {variant!r}; choose one of {tuple(MLP_VARIANTS)}.")
    if batch_size > len(labels):
        raise ValueError(f"batch size {batch_size} exceeds the {len(labels)} examples available.")
    hidden, activation = MLP_VARIANTS[variant]
    model = MLP(hidden, activation, num_classes=int(np.max(labels)) + 1)
    features = pooled_features(np.asarray(images), pool)

    def sample(key):
        return model.init(key, jnp.zeros((1, features.shape[1])))["params"], ()

    def loss(params, task, key, data):
        del task
        images_, labels_ = data
        idx = jax.random.randint(key, (batch_size,), 0, labels_.shape[0])
        logits = model.apply({"params": params}, images_[idx])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels_[idx]).mean()

    data = (jnp.asarray(features), jnp.asarray(labels, jnp.int32))
    return TaskFamily(variant, sample, loss, data)


def randomly_scaled(family: TaskFamily, log_range: float) -> TaskFamily:
    """Random scaling (Lv, Jiang and Li, 2017): a task of `family` with a scale c per coordinate,
    c_i = exp(u_i), u_i ~ U(-r, r), r = `log_range`. Its loss is f(c ⊙ θ) and it starts at θ₀ / c:
    the same trajectory of c ⊙ θ seen through gradients c ⊙ ∇f(c ⊙ θ), so an optimizer meta-trained
    on it meets gradients of many scales."""
    def sample(key):
        task_key, scale_key = jax.random.split(key)
        theta, task = family.sample(task_key)
        leaves, treedef = jax.tree.flatten(theta)
        keys = jax.random.split(scale_key, len(leaves))
        scales = treedef.unflatten([
            jnp.exp(jax.random.uniform(k, jnp.shape(x), minval=-log_range, maxval=log_range))
            for k, x in zip(keys, leaves)])
        return jax.tree.map(jnp.divide, theta, scales), (task, scales)

    def loss(theta, task, key, data):
        task, scales = task
        return family.loss(jax.tree.map(jnp.multiply, theta, scales), task, key, data)

    return TaskFamily(f"{family.name}_randomly_scaled", sample, loss, family.data)


def mixture(families: Sequence[TaskFamily]) -> TaskFamily:
    """Tasks of several families whose parameters have one structure (an MLP on datasets of one
    image size): a task draws its family uniformly, and its loss is that family's loss on that
    family's data (`data` holds every family's, in order). Each step computes every member's
    loss, so a mixture of n costs n loss evaluations per step."""
    shapes = [jax.tree.map(lambda x: x.shape, jax.eval_shape(family.sample, jax.random.PRNGKey(0))[0])
              for family in families]
    for family, shape in zip(families[1:], shapes[1:]):
        if shape != shapes[0]:
            raise ValueError(f"Cannot mix task families {families[0].name!r} and {family.name!r}: "
                             "their parameters differ in shape (datasets of different image sizes "
                             "or numbers of classes?).")

    def sample(key):
        choice_key, task_key = jax.random.split(key)
        index = jax.random.randint(choice_key, (), 0, len(families))
        draws = [family.sample(task_key) for family in families]
        theta = jax.tree.map(lambda *xs: jnp.stack(xs)[index], *(theta for theta, _ in draws))
        return theta, (index, tuple(task for _, task in draws))

    def loss(theta, task, key, data):
        # Every member's loss, the task's selected: a branch per task (lax.switch) becomes the
        # same select under vmap, and does not compose with shard_map's varying axes.
        index, tasks = task
        return jax.lax.select_n(index, *(family.loss(theta, member_task, key, member_data)
                                         for family, member_task, member_data
                                         in zip(families, tasks, data)))

    return TaskFamily("+".join(family.name for family in families), sample, loss,
                      tuple(family.data for family in families))


DATA_SPLITS = ("train_test", "test_halves")


def load_split(dataset: str, split: str, data_dir: str | None = None,
               data_split: str = "train_test") -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of `split` ('train' for meta-training, 'test' held out).

    data_split='train_test' uses the dataset's own splits; 'test_halves' splits the test split in
    two fixed disjoint halves (for MNIST where only the test files are at hand).
    """
    if data_split not in DATA_SPLITS:
        raise ValueError(f"Unknown data_split {data_split!r}; choose one of {DATA_SPLITS}.")
    if data_split == "train_test":
        ds = common_data.load(dataset, split, data_dir)
        return ds.images, ds.labels
    ds = common_data.load(dataset, "test", data_dir)
    order = np.random.default_rng(0).permutation(len(ds))
    half = order[:len(ds) // 2] if split == "train" else order[len(ds) // 2:]
    return ds.images[half], ds.labels[half]


def make_family(name: str, dataset: str = "digits", split: str = "train",
                data_dir: str | None = None, batch_size: int = 128,
                data_split: str = "train_test", pool: int = 1) -> TaskFamily:
    if name == "quadratic":
        return quadratic_family()
    if name not in MLP_VARIANTS:
        raise ValueError(f"Unknown task family {name!r}; choose one of {FAMILIES}.")
    images, labels = load_split(dataset, split, data_dir, data_split)
    return mlp_family(images, labels, name, batch_size, pool)


# --------------------------------------------------------------------------------------------
# Training one task with an optax transformation


class Trajectory(NamedTuple):
    """A task being trained: parameters, optimizer state, the task and its minibatch key."""
    params: Any
    opt_state: Any
    task: Any
    key: jax.Array


def start(tx: optax.GradientTransformation, family: TaskFamily, key: jax.Array) -> Trajectory:
    """A fresh task drawn with `key`, at θ₀ with `tx`'s initial state."""
    task_key, batch_key = jax.random.split(key)
    params, task = family.sample(task_key)
    return Trajectory(params, tx.init(params), task, batch_key)


def unroll(tx: optax.GradientTransformation, family: TaskFamily, traj: Trajectory,
           num_steps: int, first_step: jax.Array | int = 0, data: Any = None,
           second_order: bool = True) -> tuple[Trajectory, jax.Array]:
    """`num_steps` updates of `tx` from step `first_step`; returns (trajectory, [f(θ_t)]).

    Step t evaluates f(θ_t) and ∇f(θ_t) on minibatch fold_in(key, t), then θ_{t+1} = θ_t + u_t.
    With `second_order=False` the gradient fed to `tx` is a constant for differentiation (the
    paper's choice: no second derivatives of f in the meta-gradient).
    """
    data = family.data if data is None else data
    value_and_grad = jax.value_and_grad(family.loss)

    def step(carry, t):
        params, opt_state = carry
        loss, grads = value_and_grad(params, traj.task, jax.random.fold_in(traj.key, t), data)
        if not second_order:
            grads = jax.lax.stop_gradient(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    steps = first_step + jnp.arange(num_steps)
    (params, opt_state), losses = jax.lax.scan(step, (traj.params, traj.opt_state), steps)
    return traj._replace(params=params, opt_state=opt_state), losses


def loss_at(family: TaskFamily, traj: Trajectory, step: jax.Array | int, data: Any) -> jax.Array:
    """f(θ) of the trajectory's current parameters on the minibatch of step `step`,
    fold_in(key, step): the value `unroll` reports when it reaches that step."""
    return family.loss(traj.params, traj.task, jax.random.fold_in(traj.key, step), data)


def scored_unroll(tx: optax.GradientTransformation, family: TaskFamily, traj: Trajectory,
                  num_steps: int, first_step: jax.Array | int = 0, data: Any = None,
                  second_order: bool = True) -> tuple[Trajectory, jax.Array]:
    """`unroll` from step s = `first_step` for K = `num_steps` steps, scored after each update:
    returns (trajectory, [f(θ_{s+1}), ..., f(θ_{s+K})]), f(θ_t) on minibatch t.

    These are the terms of the meta-objective Σ_{t=1..T} f(θ_t): each depends on φ through the
    update just made (f(θ_s) does not, under truncation), and the last unroll of a horizon ends
    with f(θ_T). Costs one loss evaluation more than `unroll`.
    """
    data = family.data if data is None else data
    traj, losses = unroll(tx, family, traj, num_steps, first_step, data, second_order)
    final = loss_at(family, traj, first_step + num_steps, data)
    return traj, jnp.append(losses[1:], final)


def learning_curve(tx: optax.GradientTransformation, family: TaskFamily, key: jax.Array,
                   num_steps: int, data: Any = None) -> jax.Array:
    """f(θ_t) for t = 0 .. num_steps of a fresh task trained by `tx` (num_steps + 1 values)."""
    data = family.data if data is None else data
    traj, losses = unroll(tx, family, start(tx, family, key), num_steps, 0, data)
    return jnp.append(losses, loss_at(family, traj, num_steps, data))
