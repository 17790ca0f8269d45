"""Child networks of the CNN space: built from an architecture, trained for real, scored on a
validation split carved from the training set.

A child is a stack of `conv(filter_height x filter_width, num_filters, stride) -> ReLU` layers
(Zoph & Le's per-layer decisions; 'SAME' padding by default), then a dense softmax layer on the
flattened last feature map (which, unlike global average pooling, learns within the few hundred
steps a CPU search can afford). It is trained with Adam on cross-entropy for `num_steps`
minibatches (their order a pure function of (seed, step)), and its reward is the accuracy on the
held-out validation examples. The test split is used once, by `ChildObjective.final_test`, for
the architecture the search chose.

Compilation is per architecture *shape* (its layer tuple): the jitted train chunk (a `lax.scan`
over `steps_per_call` steps) and the evaluation function are compiled ahead of time with
`jit(...).lower(...).compile()`, cached, and their compile time is reported apart from the
training time.

Data parallelism: training and evaluation run over a `common.parallel` mesh. Every minibatch (and
every evaluation batch) is split along the mesh's `data` axis; parameters and Adam state are
replicated, so the gradient of the mean loss is the only cross-device reduction. The child data
set is small and is held whole, replicated, by every device of every host; each step gathers its
minibatch from it with indices that are a pure function of (seed, step), the same on every
process, so a child trains to the same parameters on any number of devices and processes (up to
the order of the floating-point reduction).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import Mesh

from common import data, parallel
from common.config import check_positive
from nas.search_space import SearchSpace, cnn_layers, cnn_space

Layers = tuple[tuple[int, int, int, int], ...]  # (filter_height, filter_width, filters, stride)
PADDINGS = ("SAME", "VALID")


@dataclasses.dataclass(frozen=True)
class ChildConfig:
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    num_steps: int = 200
    batch_size: int = 64
    learning_rate: float = 3e-3
    validation_size: int = 5000
    padding: str = "SAME"
    seed: int = 0
    steps_per_call: int = 50
    eval_batch_size: int = 500

    def validate(self) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"Unknown padding {self.padding!r}; choose SAME or VALID.")
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


def count_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


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


def load_child_data(config: ChildConfig, with_test: bool = True) -> ChildData:
    train, validation = carve_validation(data.load(config.dataset, "train", config.data_dir),
                                         config.validation_size)
    test = data.load(config.dataset, "test", config.data_dir) if with_test else None
    return ChildData(train, validation, test)


class CompiledChild:
    """init / train-chunk / evaluate of one architecture shape, compiled ahead of time for `mesh`:
    parameters, optimizer state and the data set replicated, minibatch indices (so minibatches)
    and evaluation batches split along the batch dimension."""

    def __init__(self, layers: Layers, num_classes: int, image_shape: tuple[int, ...],
                 config: ChildConfig, num_train: int, mesh: Mesh, eval_batch_size: int):
        self.model = ChildCNN(layers, num_classes, config.padding)
        self.optimizer = optax.adam(config.learning_rate)
        self.batch_sharding = parallel.batch_sharding(mesh)
        replicated = parallel.replicated_sharding(mesh)
        start = time.perf_counter()
        init = functools.partial(self._init, config.seed, image_shape)
        self.init = jax.jit(init, out_shardings=replicated).lower().compile()
        params, opt_state = jax.eval_shape(init)
        images = jax.ShapeDtypeStruct((num_train, *image_shape), jnp.uint8)
        labels = jax.ShapeDtypeStruct((num_train,), jnp.int32)
        idx = jax.ShapeDtypeStruct((config.steps_per_call, config.batch_size), jnp.int32)
        active = jax.ShapeDtypeStruct((config.steps_per_call,), jnp.bool_)
        self.train_chunk = jax.jit(
            self._train_chunk, donate_argnums=(0, 1),
            in_shardings=(replicated,) * 4 + (parallel.batch_sharding(mesh, axis=1), replicated),
            out_shardings=replicated).lower(params, opt_state, images, labels, idx,
                                            active).compile()
        eval_images = jax.ShapeDtypeStruct((eval_batch_size, *image_shape), jnp.uint8)
        eval_labels, eval_valid = (jax.ShapeDtypeStruct((eval_batch_size,), dtype)
                                   for dtype in (jnp.int32, jnp.bool_))
        self.num_correct = jax.jit(
            self._num_correct, in_shardings=(replicated,) + (self.batch_sharding,) * 3,
            out_shardings=replicated).lower(params, eval_images, eval_labels,
                                            eval_valid).compile()
        self.compile_s = time.perf_counter() - start

    def _init(self, seed: int, image_shape: tuple[int, ...]):
        params = self.model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape)))["params"]
        return params, self.optimizer.init(params)

    def loss(self, params, images, labels):
        logits = self.model.apply({"params": params}, data_to_float(images))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def _train_chunk(self, params, opt_state, images, labels, idx, active):
        """`len(idx)` Adam steps on minibatches images[idx[t]]; steps with active=False skipped."""
        def step(carry, xs):
            params, opt_state = carry
            batch_idx, is_active = xs
            batch = jax.lax.with_sharding_constraint((images[batch_idx], labels[batch_idx]),
                                                     self.batch_sharding)
            loss, grads = jax.value_and_grad(self.loss)(params, *batch)
            updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
            new = (optax.apply_updates(params, updates), new_opt_state)
            keep = lambda n, o: jnp.where(is_active, n, o)  # noqa: E731
            return jax.tree.map(keep, new, (params, opt_state)), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (idx, active))
        return params, opt_state, losses

    def _num_correct(self, params, images, labels, valid):
        logits = self.model.apply({"params": params}, data_to_float(images))
        return jnp.sum((jnp.argmax(logits, -1) == labels) & valid)


def shard_whole_batch(mesh: Mesh, batch: np.ndarray, axis: int = 0) -> jax.Array:
    """A batch that every process holds whole, as one global array split over the mesh along
    `axis`; each process places only the pieces of its own devices."""
    return jax.make_array_from_callback(batch.shape, parallel.batch_sharding(mesh, axis),
                                        lambda index: batch[index])


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
        batch = [shard_whole_batch(mesh, x) for x in (images, labels, valid)]
        correct += int(parallel.to_host(compiled.num_correct(params, *batch)))
    return correct / len(dataset)


class ChildTrainer:
    """Trains children data-parallel over `mesh` (default: every device of every process) on
    fixed data, caching compiled functions per architecture shape.

    `config.batch_size` is the global minibatch; it must be divisible by the number of devices.
    The evaluation batch is `config.eval_batch_size` rounded up to a multiple of it.
    """

    def __init__(self, config: ChildConfig, child_data: ChildData, mesh: Mesh | None = None):
        config.validate()
        self.config, self.data = config, child_data
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.per_device_batch = parallel.check_global_batch(config.batch_size, self.mesh,
                                                            "child batch size")
        num_devices = self.mesh.devices.size
        self.eval_batch_size = -(-config.eval_batch_size // num_devices) * num_devices
        self.train_images, self.train_labels = parallel.replicate(
            self.mesh, (child_data.train.images, child_data.train.labels))
        self._compiled: dict[Layers, CompiledChild] = {}
        self.compile_s = 0.0
        self.train_s = 0.0

    def compiled(self, layers: Layers) -> CompiledChild:
        if layers not in self._compiled:
            child = CompiledChild(layers, self.data.num_classes, self.data.train.image_shape,
                                  self.config, len(self.data.train), self.mesh,
                                  self.eval_batch_size)
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
                                               config.seed, int(min(s, num_steps - 1)))
                            for s in steps]).astype(np.int32)
            params, opt_state, chunk_losses = child.train_chunk(
                params, opt_state, self.train_images, self.train_labels,
                shard_whole_batch(self.mesh, idx, axis=1),
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
                        "params": count_params(params),
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

    def final_test(self, architecture: Sequence[int], num_steps: int) -> dict[str, Any]:
        """Retrains `architecture` for `num_steps`; its validation and test accuracy."""
        return retrain_and_test(self.trainer, cnn_layers(self.space, architecture), num_steps)


def retrain_and_test(trainer: ChildTrainer, layers: Layers, num_steps: int) -> dict[str, Any]:
    if trainer.data.test is None:
        raise ValueError("No test split loaded.")
    params, info = trainer.train(layers, num_steps)
    return {"layers": [list(layer) for layer in layers], "num_steps": num_steps, **info,
            "validation_accuracy": trainer.accuracy(layers, params, trainer.data.validation),
            "test_accuracy": trainer.accuracy(layers, params, trainer.data.test),
            "total_compile_s": trainer.compile_s, "total_train_s": trainer.train_s}


def make_problem(config, mesh: Mesh | None = None) -> tuple[SearchSpace, ChildObjective]:
    """The CNN space and child-training objective of a `nas.search.Config`, children trained
    data-parallel over `mesh`."""
    child_config = ChildConfig(dataset=config.dataset, data_dir=config.data_dir,
                               num_steps=config.num_steps, batch_size=config.batch_size,
                               learning_rate=config.child_learning_rate,
                               validation_size=config.validation_size, padding=config.padding,
                               seed=config.seed,
                               steps_per_call=min(ChildConfig.steps_per_call, config.num_steps))
    child_config.validate()
    space = cnn_space(config.num_layers, tuple(config.filter_sizes), tuple(config.num_filters),
                      tuple(config.strides))
    trainer = ChildTrainer(child_config, load_child_data(child_config), mesh)
    return space, ChildObjective(space, trainer)
