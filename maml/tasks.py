"""Task distributions and their losses: sinusoid regression and Omniglot N-way K-shot episodes.

Every sampler is a pure function of (seed, stream, step) through numpy's `default_rng([seed,
stream, step])`, so a resumed run sees exactly the tasks an uninterrupted one would. A meta-batch is
a dict {'support': {'x', 'y'}, 'query': {'x', 'y'}} of arrays with the tasks on the leading axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from common import omniglot
from maml import core, models

TRAIN_STREAM, TEST_STREAM, SPLIT_STREAM = 0, 1, 2
ROTATIONS = 4  # every rotation by 90 degrees of a character is a class of its own
TRAIN_CHARACTERS = 1200  # the paper's split: 1200 characters to meta-train, the rest (423) to test
SPLITS = ("random", "alphabets")
# Lake et al. (2015): the alphabets of images_background.zip (964 characters) and of
# images_evaluation.zip (659 characters).
BACKGROUND_ALPHABETS = (
    "Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc", "Arcadian", "Armenian",
    "Asomtavruli_(Georgian)", "Balinese", "Bengali", "Blackfoot_(Canadian_Aboriginal_Syllabics)",
    "Braille", "Burmese_(Myanmar)", "Cyrillic", "Early_Aramaic", "Futurama", "Grantha", "Greek",
    "Gujarati", "Hebrew", "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Japanese_(hiragana)",
    "Japanese_(katakana)", "Korean", "Latin", "Malay_(Jawi_-_Arabic)", "Mkhedruli_(Georgian)",
    "N_Ko", "Ojibwe_(Canadian_Aboriginal_Syllabics)", "Sanskrit", "Syriac_(Estrangelo)", "Tagalog",
    "Tifinagh")
NUM_BACKGROUND_CHARACTERS = 964
EVALUATION_ALPHABETS = (
    "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Glagolitic",
    "Gurmukhi", "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
    "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan",
    "ULOG")


# ------------------------------------------------------------------------------------------------
# Sinusoid regression


def sinusoid_tasks(seed: int, step: int, num_tasks: int, num_support: int, num_query: int,
                   stream: int = TRAIN_STREAM) -> tuple[dict, dict]:
    """A meta-batch of sinusoids y = A sin(x − b), A ~ U[0.1, 5], b ~ U[0, π], x ~ U[−5, 5].

    Returns (tasks with x, y of shape [T, K, 1], {'amplitude', 'phase'} of shape [T]).
    """
    rng = np.random.default_rng([seed, stream, step])
    amplitude = rng.uniform(0.1, 5.0, num_tasks).astype(np.float32)
    phase = rng.uniform(0.0, np.pi, num_tasks).astype(np.float32)
    x = rng.uniform(-5.0, 5.0, (num_tasks, num_support + num_query, 1)).astype(np.float32)
    y = amplitude[:, None, None] * np.sin(x - phase[:, None, None])
    tasks = {"support": {"x": x[:, :num_support], "y": y[:, :num_support]},
             "query": {"x": x[:, num_support:], "y": y[:, num_support:]}}
    return tasks, {"amplitude": amplitude, "phase": phase}


def mse(predictions, targets):
    return jnp.mean(jnp.square(predictions - targets))


def regression_learner(model) -> core.Learner:
    """Mean squared error of `model` on {'x', 'y'} batches."""
    def loss(fast, slow, batch):
        return mse(model.apply({"params": models.merge_params(fast, slow)}, batch["x"]),
                   batch["y"])

    def query_loss(fast, slow, support, query):
        value = loss(fast, slow, query)
        return value, {"loss": value}

    return core.Learner(support_loss=loss, query_loss=query_loss)


# ------------------------------------------------------------------------------------------------
# Classification episodes


BN_STATISTICS = ("transductive", "support")


def classification_learner(model, bn_statistics: str = "transductive") -> core.Learner:
    """Softmax cross-entropy of `model` on {'x', 'y'} batches; query metrics loss and accuracy.

    `bn_statistics`: "transductive" (the paper's code) normalises the query set with its own
    batch statistics; "support" normalises it with the support set's statistics (a forward pass
    over [support; query] taking statistics from the support rows), so no query example affects
    another's prediction. Support statistics never see the query in either.
    """
    if bn_statistics not in BN_STATISTICS:
        raise ValueError(f"Unknown bn_statistics {bn_statistics!r}; choose one of "
                         f"{', '.join(BN_STATISTICS)}.")

    def logits_of(fast, slow, x, stats_rows=None):
        return model.apply({"params": models.merge_params(fast, slow)}, x, stats_rows)

    def support_loss(fast, slow, batch):
        logits = logits_of(fast, slow, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def query_loss(fast, slow, support, query):
        if bn_statistics == "support":
            n = support["x"].shape[0]
            logits = logits_of(fast, slow, jnp.concatenate([support["x"], query["x"]]), n)[n:]
        else:
            logits = logits_of(fast, slow, query["x"])
        value = optax.softmax_cross_entropy_with_integer_labels(logits, query["y"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == query["y"])
        return value, {"loss": value, "accuracy": accuracy}

    return core.Learner(support_loss=support_loss, query_loss=query_loss)


def character_split(num_characters: int, seed: int,
                    num_train: int = TRAIN_CHARACTERS) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) character indices: a seed-determined choice of `num_train` characters,
    ignoring alphabets (the paper's protocol); the test characters are the rest."""
    if not 0 < num_train < num_characters:
        raise ValueError(f"Cannot split {num_characters} characters into {num_train} for "
                         "meta-training and the rest for testing; lower the number of training "
                         "characters.")
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(num_characters)
    return np.sort(order[:num_train]), np.sort(order[num_train:])


def alphabet_split(alphabets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) character indices by alphabet (Lake et al. 2015): the characters of the 30
    background alphabets to train on, those of the 20 evaluation alphabets to test on.
    `alphabets`: each character's alphabet name, as the original archives spell it."""
    unknown = sorted(set(alphabets.tolist()) - set(BACKGROUND_ALPHABETS)
                     - set(EVALUATION_ALPHABETS))
    if unknown:
        raise ValueError(f"split=alphabets needs the original Omniglot archives' alphabet names; "
                         f"unknown: {', '.join(unknown[:5])}. Pass --data_dir with "
                         "images_background.zip and images_evaluation.zip.")
    background = np.isin(alphabets, BACKGROUND_ALPHABETS)
    return np.flatnonzero(background), np.flatnonzero(~background)


def split_characters(alphabets: np.ndarray, split: str, seed: int,
                     num_train: int = TRAIN_CHARACTERS) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) character indices of `split`: "random" (`character_split`: `num_train`
    characters chosen by `seed`, ignoring alphabets -- Finn et al.) or "alphabets"
    (`alphabet_split`; `seed` and `num_train` unused)."""
    if split == "alphabets":
        return alphabet_split(alphabets)
    if split == "random":
        return character_split(len(alphabets), seed, num_train)
    raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")


def episodes(images: np.ndarray, seed: int, step: int, num_tasks: int, ways: int, shots: int,
             queries: int, stream: int = TRAIN_STREAM, rotate: bool = True,
             with_classes: bool = False) -> dict:
    """A meta-batch of N-way K-shot episodes from `images` (uint8 [characters, drawings, H, W]).

    Per task: `ways` distinct characters, each shown in one random rotation by r x 90 degrees when
    `rotate` (so every rotation of a character is a class of its own, as in the paper's code; one
    episode never holds two rotations of a character), and for each class `shots + queries`
    distinct drawings, the first `shots` in the support set and the others in the query set.
    Labels 0..ways-1 follow the (random) class order. x is float32 [T, ways * n, H, W, 1] in
    [0, 1] (ink = 1), class-major; y is int32. All indexing is vectorised; no Python work per
    image. `with_classes`: also 'classes' int32 [T, ways], the global class of each episode label
    (character index x ROTATIONS + rotation; the character index without `rotate`), for a
    classifier over all classes of `images`.
    """
    num_characters, num_drawings = images.shape[:2]
    if ways > num_characters:
        raise ValueError(f"{ways}-way episodes need {ways} distinct characters; only "
                         f"{num_characters} exist.")
    if shots + queries > num_drawings:
        raise ValueError(f"{shots} support + {queries} query examples per class exceed the "
                         f"{num_drawings} drawings of each character.")
    rng = np.random.default_rng([seed, stream, step])
    character = np.argsort(rng.random((num_tasks, num_characters)), axis=1)[:, :ways]
    rotation = rng.integers(0, ROTATIONS if rotate else 1, (num_tasks, ways))
    drawings = np.argsort(rng.random((num_tasks, ways, num_drawings)),
                          axis=2)[..., :shots + queries]
    x = images[character[..., None], drawings]  # [T, ways, shots + queries, H, W]
    for r in range(1, ROTATIONS):
        chosen = rotation == r
        if chosen.any():
            x[chosen] = np.rot90(x[chosen], r, axes=(-2, -1))
    x = x.astype(np.float32)[..., None] / 255.0
    y = np.broadcast_to(np.arange(ways, dtype=np.int32)[None, :, None],
                        (num_tasks, ways, shots + queries))

    def part(a, lo, hi):
        return a[:, :, lo:hi].reshape(num_tasks, ways * (hi - lo), *a.shape[3:])

    out = {"support": {"x": part(x, 0, shots), "y": part(y, 0, shots)},
           "query": {"x": part(x, shots, shots + queries), "y": part(y, shots, shots + queries)}}
    if with_classes:
        out["classes"] = (character * (ROTATIONS if rotate else 1) + rotation).astype(np.int32)
    return out


def num_train_classes(split: str, train_characters: int, rotate: bool) -> int:
    """Classes of the meta-training characters of `split`: each character, and with `rotate` each
    of its rotations (the pretrained baseline's output size)."""
    characters = NUM_BACKGROUND_CHARACTERS if split == "alphabets" else train_characters
    return characters * (ROTATIONS if rotate else 1)


def task_slice(tasks: dict, index: int) -> dict:
    """Task `index` of a meta-batch."""
    return jax.tree.map(lambda a: a[index], tasks)


# ------------------------------------------------------------------------------------------------
# The task source of a run


class TaskSource:
    """Meta-batches of one task family as pure functions of (step): training tasks and held-out
    test tasks. `dataset` "sinusoid" or "omniglot" (loaded from `data_dir`, its characters split
    per `split_characters`: `split` "random" by `seed` into `train_characters` to meta-train on
    and the rest to test, or "alphabets" by alphabet).

    `train_ways` / `train_queries` (None: `ways` / `queries`): classes and query examples per
    class of the training episodes (Prototypical Networks train with more ways than they test).
    `data`: the Omniglot characters to use instead of loading them (e.g. synthetic ones).
    `with_classes`: training batches also hold each episode's global classes (`episodes`).
    """

    def __init__(self, dataset: str, seed: int, ways: int, shots: int, queries: int,
                 rotate: bool = True, data_dir: str | None = None, cache_dir: str | None = None,
                 train_characters: int = TRAIN_CHARACTERS, split: str = "random",
                 train_ways: int | None = None, train_queries: int | None = None,
                 data: omniglot.Omniglot | None = None, with_classes: bool = False):
        self.dataset, self.seed, self.ways, self.shots, self.queries = (dataset, seed, ways,
                                                                         shots, queries)
        self.rotate, self.with_classes = rotate, with_classes
        self.train_ways, self.train_queries = train_ways or ways, train_queries or queries
        self.train_images = self.test_images = None
        if dataset == "omniglot":
            data = data or omniglot.load_omniglot(data_dir, cache_dir)
            train, test = split_characters(data.alphabets, split, seed, train_characters)
            self.train_images, self.test_images = data.images[train], data.images[test]
            logging.info("Omniglot from %s: %d characters, %d to meta-train, %d to test (%s "
                         "split).", data.source, data.num_characters, len(train), len(test),
                         split)

    def batch(self, step: int, num_tasks: int, stream: int = TRAIN_STREAM,
              shots: int | None = None, queries: int | None = None,
              ways: int | None = None) -> dict:
        shots = shots or self.shots
        queries = queries or self.queries
        if self.dataset == "sinusoid":
            return sinusoid_tasks(self.seed, step, num_tasks, shots, queries, stream)[0]
        images = self.train_images if stream == TRAIN_STREAM else self.test_images
        return episodes(images, self.seed, step, num_tasks, ways or self.ways, shots, queries,
                        stream, self.rotate, self.with_classes and stream == TRAIN_STREAM)

    def local_train_batch(self, step: int, num_tasks: int) -> dict:
        """This process's share of the `num_tasks` training tasks of meta-batch `step`
        (`train_ways`-way, `train_queries` queries per class)."""
        share = num_tasks // jax.process_count()
        full = self.batch(step, num_tasks, queries=self.train_queries, ways=self.train_ways)
        lo = jax.process_index() * share
        return jax.tree.map(lambda a: a[lo:lo + share], full)
