"""The small CNN classifier whose features FID and the Inception Score are computed with.

For MNIST-like data the Inception network of Heusel et al. is the wrong feature extractor (it was
trained on ImageNet photographs); the standard practice (TF-GAN's `mnist_frechet_distance`, and
most GAN papers on MNIST) is a classifier trained on the dataset itself. FIDs computed with
different feature extractors are not comparable, so every value names its feature layer.

Architecture (inputs 28x28x1 in [-1, 1]):
    Conv(32, 5, stride 2) -> ReLU -> Conv(64, 5, stride 2) -> ReLU -> Flatten
    -> Dense(128) -> ReLU  ["penultimate", 128 features]  -> Dense(10)  ["logits"].
Strided convolutions rather than max-pooling: XLA's CPU backward of max-pooling
(select-and-scatter) is slow.

It is trained with Adam (learning rate decayed along a cosine) on the dataset's training split,
for 5 epochs or 3,000 steps of 128, whichever is more, with random translations of up to 2 pixels
(MNIST offline has only 8,000 training digits), and cached per dataset in
`cache_dir/<dataset>-<fingerprint>/` (`params.npz`: the parameters as
`flax.traverse_util.flatten_dict(params, sep="/")`, and `classifier.json`: test accuracy and what it
was trained and tested on). Where only a test split exists (MNIST offline: `../shared/data/mnist`
holds the 10,000 test digits), the classifier trains on the first `TEST_ONLY_TRAIN` test images
and its accuracy is measured on the rest; `classifier.json` says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from common import data

FEATURE_LAYERS = ("penultimate", "logits")
TEST_ONLY_TRAIN = 8000
NUM_CLASSES = 10
INFO_FILE = "classifier.json"
PARAMS_FILE = "params.npz"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    epochs: int = 5
    min_steps: int = 3000  # small training sets (8,000 MNIST test digits offline) train longer
    batch_size: int = 128
    learning_rate: float = 1e-3  # Adam, decayed to 0 along a cosine
    max_shift: int = 2  # augmentation: random translations of up to this many pixels
    seed: int = 0
    max_train_examples: int | None = None  # tests: train on a small subset


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        for features in (32, 64):
            x = nn.relu(nn.Conv(features, (5, 5), strides=(2, 2))(x))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return {"penultimate": x, "logits": nn.Dense(NUM_CLASSES)(x)}


@dataclasses.dataclass(frozen=True)
class Classifier:
    params: dict
    info: dict  # test_accuracy, trained_on, tested_on, ...

    def features(self, images: jax.Array | np.ndarray, batch_size: int = 1000) -> dict[str, np.ndarray]:
        """Both feature layers of float images in [-1, 1], [N, 28, 28, 1], batch by batch."""
        outs = [_apply(self.params, jnp.asarray(images[i:i + batch_size]))
                for i in range(0, len(images), batch_size)]
        return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in FEATURE_LAYERS}


@jax.jit
def _apply(params, x):
    return CNN().apply({"params": params}, x)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                        "l2gl", "classifiers")


def _splits(config: ClassifierConfig) -> tuple[data.Dataset, data.Dataset, str, str]:
    """(train, test, description of each); falls back to splitting the test set when needed."""
    test = data.load(config.dataset, "test", config.data_dir)
    try:
        train = data.load(config.dataset, "train", config.data_dir)
        return train, test, f"{config.dataset} train split ({train.source})", \
            f"{config.dataset} test split ({len(test)} images)"
    except data.DataNotFoundError:
        head, tail = (data.select(test, split)
                      for split in (f"test[:{TEST_ONLY_TRAIN}]", f"test[{TEST_ONLY_TRAIN}:]"))
        return (head, tail,
                f"{config.dataset} test images 0-{TEST_ONLY_TRAIN - 1} (no training split found)",
                f"{config.dataset} test images {TEST_ONLY_TRAIN}-{len(test) - 1}")


def accuracy(params, images: np.ndarray, labels: np.ndarray) -> float:
    logits = Classifier(params, {}).features(data.to_float(images))["logits"]
    return float(np.mean(np.argmax(logits, -1) == labels))


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image translated by its own (dy, dx) in [-max_shift, max_shift]^2, filled with -1."""
    if not max_shift:
        return images
    n, h, w = images.shape[:3]
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                    constant_values=-1.0)
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train(config: ClassifierConfig) -> Classifier:
    """Trains the CNN with Adam and softmax cross-entropy; returns it with its test accuracy."""
    train_set, test_set, trained_on, tested_on = _splits(config)
    images = data.to_float(train_set.images[:config.max_train_examples])
    labels = train_set.labels[:config.max_train_examples]
    batch = min(config.batch_size, len(images))
    steps = max(config.epochs * (len(images) // batch), config.min_steps)
    tx = optax.adam(optax.cosine_decay_schedule(config.learning_rate, steps))
    params = CNN().init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 28, 28, 1)))["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = CNN().apply({"params": p}, x)["logits"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for s in range(steps):
        idx = data.batch_indices(len(images), batch, config.seed, s)
        x = random_shift(images[idx], config.max_shift, np.random.default_rng([config.seed, s]))
        params, opt_state, loss = step(params, opt_state, x, labels[idx])
    acc = accuracy(params, test_set.images, test_set.labels)
    info = {"dataset": config.dataset, "test_accuracy": acc, "trained_on": trained_on,
            "num_train_examples": len(images), "tested_on": tested_on,
            "num_test_examples": len(test_set), "epochs": config.epochs, "steps": steps,
            "feature_layers": {"penultimate": "ReLU(Dense(128)), 128 features",
                               "logits": "Dense(10) logits"},
            "config": dataclasses.asdict(config)}
    logging.info("Classifier on %s: test accuracy %.4f (%s).", config.dataset, acc, trained_on)
    return Classifier(params, info)


def _fingerprint(config: ClassifierConfig) -> str:
    return hashlib.sha1(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()
                        ).hexdigest()[:10]


def load_or_train(config: ClassifierConfig, cache_dir: str | None = None) -> Classifier:
    """The cached classifier of `config`, training and caching it first when absent."""
    directory = os.path.join(cache_dir or default_cache_dir(),
                             f"{config.dataset}-{_fingerprint(config)}")
    info_path, params_path = (os.path.join(directory, f) for f in (INFO_FILE, PARAMS_FILE))
    if os.path.exists(info_path) and os.path.exists(params_path):
        with np.load(params_path) as saved, open(info_path) as f:
            params = traverse_util.unflatten_dict({k: saved[k] for k in saved.files}, sep="/")
            return Classifier(params, json.load(f))
    classifier = train(config)
    os.makedirs(directory, exist_ok=True)
    with open(params_path + ".tmp", "wb") as f:
        np.savez(f, **traverse_util.flatten_dict(jax.device_get(classifier.params), sep="/"))
    os.replace(params_path + ".tmp", params_path)
    with open(info_path + ".tmp", "w") as f:
        f.write(json.dumps(classifier.info, indent=2))
    os.replace(info_path + ".tmp", info_path)  # info last: its presence means the params are whole
    return classifier
