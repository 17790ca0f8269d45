"""Child networks of the CNN space: built from an architecture, trained for real, scored on a
validation split carved from the training set.

A child is a stack of `conv(filter_height x filter_width, num_filters, stride) -> ReLU` layers
(Zoph & Le's per-layer decisions; 'SAME' padding by default), then a dense softmax layer on the
flattened last feature map (which, unlike global average pooling, learns within the few hundred
steps a CPU search can afford). It is trained with Adam on cross-entropy for `num_steps`
minibatches (their order a pure function of (seed, step)), and its reward is the accuracy on the
held-out validation examples. The test split is used once, by `nas.evaluate.final_test`, for the
architecture the search chose.

Compilation is per architecture *shape* (its layer tuple): the jitted train chunk (`steps_per_call`
steps, a fully unrolled `lax.scan`) and the evaluation function are compiled ahead of time by
`jit_child` (`jit(...).lower(...).compile()`), cached by `ChildTrainer`, and their compile time is
reported apart from the training time. The chunk is unrolled because XLA's CPU backend runs the
gradient convolutions of a *rolled* loop body through a slow generic path (jax-ml/jax#12868); the
unrolled chunk computes the same steps (tested against one jitted step at a time).

Data parallelism: training and evaluation run over a `common.parallel` mesh. Every minibatch (and
every evaluation batch) is split along the mesh's `data` axis; parameters and Adam state are
replicated, so the gradient of the mean loss is the only cross-device reduction. The child data
set is small and is held whole, replicated, by every device of every host; each step gathers its
minibatch from it with indices that are a pure function of (seed, step), the same on every
process, so a child trains to the same parameters on any number of devices and processes (up to
the order of the floating-point reduction).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import Mesh, NamedSharding

from common import data, parallel
from common.config import check_choices, check_positive, choice
from nas.search_space import SearchSpace, cnn_layers

Layers = tuple[tuple[int, int, int, int], ...]  # (filter_height, filter_width, filters, stride)
PADDINGS = ("SAME", "VALID")


@dataclasses.dataclass(frozen=True)
class ChildConfig:
    """Training and scoring of a child network (CNN space).

    Attributes:
      dataset: Dataset the children train on (`common.data`).
      num_steps: Training steps of each child.
      batch_size: Global minibatch of a child, split over all devices (a multiple of their number).
      learning_rate: Child Adam learning rate.
      validation_size: Training examples held out for validation (the reward).
      padding: Convolution padding.
      steps_per_call: Training steps per compiled call (unrolled: compile time grows with it).
      eval_batch_size: Evaluation batch (rounded up to a multiple of the number of devices).
    """
    dataset: str = choice("fashion_mnist", data.DATASETS)
    num_steps: int = 200
    batch_size: int = 64
    learning_rate: float = 3e-3
    validation_size: int = 5000
    padding: str = choice("SAME", PADDINGS)
    steps_per_call: int = 10
    eval_batch_size: int = 500

    def validate(self) -> None:
        check_choices(self)
        check_positive(self, ("num_steps", "batch_size", "validation_size", "steps_per_call",
                              "eval_batch_size"))


class VanishingFeatureMapError(ValueError):
    """The architecture's filters and strides shrink the feature map to nothing."""


def feature_map_sizes(layers: Layers, image_hw: tuple[int, int], padding: str):
    """Spatial size after each layer: SAME: ceil(n / s); VALID: floor((n - k) / s) + 1."""
    sizes, (h, w) = [], image_hw
    for i, (fh, fw, _, stride) in enumerate(layers):
        if padding == "SAME":
            h, w = math.ceil(h / stride), math.ceil(w / stride)
        else:
            h, w = (h - fh) // stride + 1, (w - fw) // stride + 1
        if h < 1 or w < 1:
            raise VanishingFeatureMapError(
                f"Layer {i} ({fh}x{fw} filter, stride {stride}, {padding} padding) leaves no "
                f"feature map (input {sizes[-1] if sizes else image_hw}).")
        sizes.append((h, w))
    return sizes


class ChildCNN(nn.Module):
    layers: Layers
    num_classes: int
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x):
        for fh, fw, filters, stride in self.layers:
            x = nn.relu(nn.Conv(filters, (fh, fw), strides=stride, padding=self.padding)(x))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


@dataclasses.dataclass
class ChildData:
    """Images (uint8, on device) and labels of the train / validation (/ test) splits."""
    train: data.Dataset
    validation: data.Dataset
    test: data.Dataset | None = None

    @property
    def num_classes(self) -> int:
        return int(max(self.train.labels.max(), self.validation.labels.max())) + 1


def carve_validation(train: data.Dataset, size: int) -> tuple[data.Dataset, data.Dataset]:
    """Splits a fixed random `size` examples (the same for every seed) off the training set."""
    if size >= len(train):
        raise ValueError(f"validation_size {size} leaves no training examples of {len(train)}.")
    order = np.random.default_rng(0).permutation(len(train))
    pick = lambda idx, split: dataclasses.replace(  # noqa: E731
        train, images=train.images[idx], labels=train.labels[idx], split=split)
    return pick(np.sort(order[size:]), "train"), pick(np.sort(order[:size]), "validation")


def load_child_data(config: ChildConfig, data_dir: str | None = None,
                    with_test: bool = True) -> ChildData:
    train, validation = carve_validation(data.load(config.dataset, "train", data_dir),
                                         config.validation_size)
    test = data.load(config.dataset, "test", data_dir) if with_test else None
    return ChildData(train, validation, test)


def child_loss(model: nn.Module, params, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, data_to_float(images))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_init(model: nn.Module, optimizer: optax.GradientTransformation, seed: int,
              image_shape: tuple[int, ...]):
    """() -> (params, optimizer state) of a fresh child."""
    def init():
        params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape)))["params"]
        return params, optimizer.init(params)
    return init


def make_train_chunk(model: nn.Module, optimizer: optax.GradientTransformation,
                     batch_sharding: NamedSharding):
    """train_chunk(params, opt_state, images, labels, idx, active): `len(idx)` Adam steps on
    minibatches images[idx[t]] (split by `batch_sharding`); steps with active=False skipped. The
    steps are unrolled (see the module docstring)."""
    def train_chunk(params, opt_state, images, labels, idx, active):
        def step(carry, xs):
            params, opt_state = carry
            batch_idx, is_active = xs
            batch = jax.lax.with_sharding_constraint((images[batch_idx], labels[batch_idx]),
                                                     batch_sharding)
            loss, grads = jax.value_and_grad(functools.partial(child_loss, model))(params, *batch)
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            new = (optax.apply_updates(params, updates), new_opt_state)
            return optax.tree.where(is_active, new, (params, opt_state)), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (idx, active),
                                                       unroll=True)
        return params, opt_state, losses
    return train_chunk


def num_correct(model: nn.Module, params, images: jax.Array, labels: jax.Array,
                valid: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, data_to_float(images))
    return jnp.sum((jnp.argmax(logits, -1) == labels) & valid)


@dataclasses.dataclass(frozen=True)
class CompiledChild:
    """init / train-chunk / evaluate of one architecture shape, compiled for a mesh
    (`jit_child`), and the seconds the compilation took."""
    model: ChildCNN
    init: Callable
    train_chunk: Callable
    num_correct: Callable
    compile_s: float


def jit_child(layers: Layers, num_classes: int, image_shape: tuple[int, ...],
              config: ChildConfig, num_train: int, mesh: Mesh, eval_batch_size: int,
              seed: int) -> CompiledChild:
    """Compiles a child's functions ahead of time for `mesh`: parameters, optimizer state and the
    data set replicated, minibatch indices (so minibatches) and evaluation batches split along the
    batch dimension."""
    model = ChildCNN(layers, num_classes, config.padding)
    optimizer = optax.adam(config.learning_rate)
    batch_sharding = parallel.batch_sharding(mesh)
    replicated = parallel.replicated_sharding(mesh)
    start = time.perf_counter()
    init = make_init(model, optimizer, seed, image_shape)
    compiled_init = jax.jit(init, out_shardings=replicated).lower().compile()
    params, opt_state = jax.eval_shape(init)
    images = jax.ShapeDtypeStruct((num_train, *image_shape), jnp.uint8)
    labels = jax.ShapeDtypeStruct((num_train,), jnp.int32)
    idx = jax.ShapeDtypeStruct((config.steps_per_call, config.batch_size), jnp.int32)
    active = jax.ShapeDtypeStruct((config.steps_per_call,), jnp.bool_)
    train_chunk = jax.jit(
        make_train_chunk(model, optimizer, batch_sharding), donate_argnums=(0, 1),
        in_shardings=(replicated,) * 4 + (parallel.batch_sharding(mesh, axis=1), replicated),
        out_shardings=replicated).lower(params, opt_state, images, labels, idx, active).compile()
    eval_images = jax.ShapeDtypeStruct((eval_batch_size, *image_shape), jnp.uint8)
    eval_labels, eval_valid = (jax.ShapeDtypeStruct((eval_batch_size,), dtype)
                               for dtype in (jnp.int32, jnp.bool_))
    compiled_num_correct = jax.jit(
        functools.partial(num_correct, model),
        in_shardings=(replicated,) + (batch_sharding,) * 3,
        out_shardings=replicated).lower(params, eval_images, eval_labels, eval_valid).compile()
    return CompiledChild(model, compiled_init, train_chunk, compiled_num_correct,
                         time.perf_counter() - start)


def data_to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1], as `common.data.to_float`, inside jit."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def accuracy(compiled: CompiledChild, params, dataset: data.Dataset, batch_size: int,
             mesh: Mesh) -> float:
    """Fraction of `dataset` classified correctly, in batches of `batch_size` split over `mesh`
    (the last one padded, the padding masked out)."""
    correct = 0
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start:start + batch_size]
        labels = dataset.labels[start:start + batch_size]
        valid = np.arange(batch_size) < len(labels)
        pad = batch_size - len(labels)
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
        batch = parallel.place([images, labels, valid], parallel.batch_sharding(mesh))
        correct += int(parallel.to_host(compiled.num_correct(params, *batch)))
    return correct / len(dataset)


class ChildTrainer:
    """Trains children data-parallel over `mesh` (default: every device of every process) on
    fixed data, caching compiled functions per architecture shape; `seed` fixes the children's
    initialisation and minibatch order.

    The cache keeps the `max_cached_shapes` most recently used shapes: every compiled child holds
    hundreds of memory mappings of JIT-compiled code, and an unbounded cache ends a long search
    at the kernel's limit on mappings (`vm.max_map_count`, 65,530 by default: about 100 shapes)
    with "LLVM compilation error: Cannot allocate memory" and a crash.

    `config.batch_size` is the global minibatch; it must be divisible by the number of devices.
    The evaluation batch is `config.eval_batch_size` rounded up to a multiple of it.
    """

    def __init__(self, config: ChildConfig, child_data: ChildData, mesh: Mesh | None = None,
                 seed: int = 0, max_cached_shapes: int = 8):
        config.validate()
        self.config, self.data, self.seed = config, child_data, seed
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.per_device_batch = parallel.check_global_batch(config.batch_size, self.mesh,
                                                            "child batch size")
        num_devices = self.mesh.devices.size
        self.eval_batch_size = -(-config.eval_batch_size // num_devices) * num_devices
        self.train_images, self.train_labels = parallel.replicate(
            self.mesh, (child_data.train.images, child_data.train.labels))
        self._compiled: collections.OrderedDict[Layers, CompiledChild] = collections.OrderedDict()
        self.max_cached_shapes = max_cached_shapes
        self.compile_s = 0.0
        self.train_s = 0.0

    def compiled(self, layers: Layers) -> CompiledChild:
        if layers in self._compiled:
            self._compiled.move_to_end(layers)
        else:
            while len(self._compiled) >= self.max_cached_shapes:
                self._compiled.popitem(last=False)  # frees its code and mappings
            child = jit_child(layers, self.data.num_classes, self.data.train.image_shape,
                              self.config, len(self.data.train), self.mesh,
                              self.eval_batch_size, self.seed)
            self._compiled[layers] = child
            self.compile_s += child.compile_s
        return self._compiled[layers]

    def train(self, layers: Layers, num_steps: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Trains a child from scratch; returns (params, info with losses, compile/train time)."""
        config = self.config
        num_steps = num_steps or config.num_steps
        feature_map_sizes(layers, self.data.train.image_shape[:2], config.padding)
        compile_before = self.compile_s
        child = self.compiled(layers)
        start = time.perf_counter()
        params, opt_state = child.init()
        losses = []
        chunk = config.steps_per_call
        for first in range(0, num_steps, chunk):
            steps = np.arange(first, first + chunk)
            idx = np.stack([data.batch_indices(len(self.data.train), config.batch_size,
                                               self.seed, int(min(s, num_steps - 1)))
                            for s in steps]).astype(np.int32)
            params, opt_state, chunk_losses = child.train_chunk(
                params, opt_state, self.train_images, self.train_labels,
                parallel.place(idx, parallel.batch_sharding(self.mesh, axis=1)),
                parallel.replicate(self.mesh, steps < num_steps))
            losses.append(parallel.to_host(chunk_losses)[steps < num_steps])
        losses = np.concatenate(losses)
        if not np.all(np.isfinite(losses)):
            raise FloatingPointError(f"Child {layers} diverged: non-finite training loss at step "
                                     f"{int(np.argmin(np.isfinite(losses)))}.")
        train_s = time.perf_counter() - start
        self.train_s += train_s
        head = max(len(losses) // 10, 1)
        return params, {"loss_start": float(losses[:head].mean()),
                        "loss_end": float(losses[-head:].mean()),
                        "params": int(optax.tree.size(params)),
                        "compile_s": self.compile_s - compile_before, "train_s": train_s}

    def accuracy(self, layers: Layers, params, dataset: data.Dataset) -> float:
        return accuracy(self.compiled(layers), params, dataset, self.eval_batch_size, self.mesh)


class ChildObjective:
    """Architecture of a CNN space -> validation accuracy of the trained child.

    An architecture whose feature map vanishes scores a defined 0.0 with the reason in `info`.
    """

    def __init__(self, space: SearchSpace, trainer: ChildTrainer):
        self.space, self.trainer = space, trainer

    def __call__(self, architecture: Sequence[int]) -> tuple[float, dict[str, Any]]:
        layers = cnn_layers(self.space, architecture)
        try:
            params, info = self.trainer.train(layers)
        except VanishingFeatureMapError as e:
            return 0.0, {"error": str(e)}
        accuracy_ = self.trainer.accuracy(layers, params, self.trainer.data.validation)
        return accuracy_, {**info, "validation_accuracy": accuracy_}
