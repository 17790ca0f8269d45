"""Image datasets as numpy arrays, and deterministic batch streams.

One entry point, `load(name, split, data_dir=None)`, returns a `Dataset` of `uint8` images in NHWC
layout and `int32` labels. Sources are tried in order:

1. IDX files (`train-images-idx3-ubyte.gz`, ...) in `data_dir`, then in known system locations
   (Debian's `dataset-fashion-mnist` installs `/usr/share/datasets/fashion-mnist`);
2. scikit-learn's bundled 8x8 digits for `digits` (no files needed);
3. tensorflow-datasets, when it is installed and can provide the set.

A dataset found nowhere raises `DataNotFoundError` naming every place looked and how to fix it.
A `data_dir` that does not hold the dataset, when a later source does, gives one warning line
naming both.
A corrupt or truncated file raises `CorruptDataError` naming the file.

Batches come from `batch_indices(num_examples, batch_size, seed, step)`, a pure function of its
arguments, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import re
import struct

import numpy as np
from absl import logging

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_DATASETS = ("mnist", "fashion_mnist", "kmnist")
DATASETS = IDX_DATASETS + ("digits",)
SYSTEM_LOCATIONS = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
}
DIGITS_SIZE = 28
DIGITS_TEST_FRACTION = 1 / 6


class DataNotFoundError(FileNotFoundError):
    """The requested dataset is in none of the places searched."""


class CorruptDataError(ValueError):
    """A data file exists but cannot be read as what it claims to be."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # uint8, [N, H, W, C]
    labels: np.ndarray  # int32, [N]
    name: str
    split: str
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


# --------------------------------------------------------------------------------------------
# IDX files


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzip-compressed) into a numpy array.

    The format: two zero bytes, a dtype code, the number of dimensions, then one big-endian uint32
    per dimension, then the data. Anything that does not fit raises `CorruptDataError`.
    """
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises these on truncated or garbled archives
        raise CorruptDataError(f"{path}: cannot be read ({e}). Re-download the file.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptDataError(f"{path}: not an IDX file (bad magic number {raw[:4]!r}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{path}: truncated IDX header.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CorruptDataError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes of data) but the file "
            f"holds {len(raw) - header} bytes; the file is truncated or corrupt. Re-download it."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx_pair(directory: str, split: str) -> tuple[str, str] | None:
    paths = []
    for stem in IDX_NAMES[split]:
        for candidate in (stem + ".gz", stem):
            if os.path.isfile(os.path.join(directory, candidate)):
                paths.append(os.path.join(directory, candidate))
                break
        else:
            return None
    return paths[0], paths[1]


def load_idx_dir(directory: str, split: str, name: str = "idx") -> Dataset:
    found = _find_idx_pair(directory, split)
    if found is None:
        raise DataNotFoundError(f"{directory}: no {' / '.join(IDX_NAMES[split])} (.gz) files.")
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CorruptDataError(
            f"{found[0]} / {found[1]}: images {images.shape} and labels {labels.shape} do not "
            "form a labelled image set."
        )
    return Dataset(images[..., None].astype(np.uint8), labels.astype(np.int32), name, split,
                   directory)


# --------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(split: str) -> Dataset:
    """scikit-learn's 1,797 real 8x8 digits, resized to 28x28 (bicubic), 0..16 mapped to 0..255.

    The split is fixed: a permutation drawn with seed 0 puts 1/6 of the digits (300) in `test`.
    The digits are read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`,
    what `sklearn.datasets.load_digits` parses) without importing scikit-learn, whose import
    takes seconds.
    """
    from PIL import Image

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("Dataset 'digits' needs scikit-learn: pip install scikit-learn.")
    table = np.loadtxt(os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                                    "digits.csv.gz"), delimiter=",")
    small = np.clip(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    targets = table[:, -1].astype(np.int32)
    images = np.stack([
        np.asarray(Image.fromarray(im).resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC))
        for im in small
    ])
    order = np.random.default_rng(0).permutation(len(images))
    num_test = int(round(len(images) * DIGITS_TEST_FRACTION))
    idx = order[:num_test] if split == "test" else order[num_test:]
    return Dataset(images[idx][..., None], targets[idx], "digits", split,
                   "sklearn.datasets.load_digits")


# --------------------------------------------------------------------------------------------
# tensorflow-datasets


def load_tfds(name: str, split: str, data_dir: str | None = None,
              download: bool = False) -> Dataset:
    """Loads `name` through tensorflow-datasets as numpy (no TensorFlow graph needed)."""
    import tensorflow_datasets as tfds

    data = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1, data_dir=data_dir,
                                   download=download))
    images, labels = np.asarray(data["image"], np.uint8), np.asarray(data["label"], np.int32)
    return Dataset(images, labels, name, split, f"tensorflow_datasets:{name}")


# --------------------------------------------------------------------------------------------
# The one entry point


def parse_split(split: str) -> tuple[str, slice]:
    """'train', 'test' or a slice of one in TFDS syntax ('test[:8000]', 'test[8000:]')."""
    match = re.fullmatch(r"(\w+)(?:\[(-?\d*):(-?\d*)\])?", split)
    if not match or match.group(1) not in IDX_NAMES:
        raise ValueError(f"Unknown split {split!r}; choose 'train' or 'test', or a slice of one "
                         "such as 'test[:8000]'.")
    base, start, stop = match.groups()
    return base, slice(int(start) if start else None, int(stop) if stop else None)


def load(name: str, split: str = "train", data_dir: str | None = None,
         tfds_download: bool = False) -> Dataset:
    """Loads dataset `name` ('mnist', 'fashion_mnist', 'kmnist', 'digits'), split 'train'/'test'
    or a slice of one ('test[:8000]': MNIST's test digits as a small training set offline)."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    base, _ = parse_split(split)
    if base != split:
        return select(load(name, base, data_dir, tfds_download), split)
    if name == "digits":
        return load_digits(split)

    looked = []
    directories = ([data_dir] if data_dir else []) + list(SYSTEM_LOCATIONS.get(name, ()))
    if data_dir and not os.path.isdir(data_dir):
        looked.append(f"--data_dir={data_dir}: no such directory")
        directories = directories[1:]
    for directory in directories:
        if _find_idx_pair(directory, split) is not None:
            return _warn_if_elsewhere(load_idx_dir(directory, split, name), data_dir, looked)
        label = f"--data_dir={directory}" if directory == data_dir else directory
        looked.append(f"{label}: no {' / '.join(IDX_NAMES[split])}[.gz]")
    try:
        return _warn_if_elsewhere(load_tfds(name, split, download=tfds_download), data_dir,
                                  looked)
    except ImportError:
        looked.append("tensorflow-datasets: not installed")
    except Exception as e:  # tfds raises many types when data is absent and offline
        looked.append(f"tensorflow-datasets '{name}': {type(e).__name__}: {str(e).splitlines()[0]}")
    remedy = (f"Put the IDX files ({IDX_NAMES[split][0]}.gz, {IDX_NAMES[split][1]}.gz) in a "
              "directory and pass --data_dir, or let tensorflow-datasets download it online")
    if name == "fashion_mnist":
        remedy += ", or `apt-get install dataset-fashion-mnist`"
    raise DataNotFoundError(f"Dataset {name!r} ({split}) not found. Looked in:\n  - "
                            + "\n  - ".join(looked) + f"\n{remedy}.")


def _warn_if_elsewhere(dataset: Dataset, data_dir: str | None, looked: list[str]) -> Dataset:
    """`dataset`, after one warning line when a `data_dir` was given but the data came from
    elsewhere (a mistyped path then does not go unnoticed)."""
    if data_dir and looked:
        logging.warning("%s; loaded %s (%s) from %s instead.", looked[0], dataset.name,
                        dataset.split, dataset.source)
    return dataset


def select(dataset: Dataset, split: str) -> Dataset:
    """The rows of `dataset` (a whole split) that the slice `split` ('test[:8000]') names."""
    base, rows = parse_split(split)
    if base != dataset.split:
        raise ValueError(f"Split {split!r} is not a slice of the {dataset.split!r} split.")
    if not len(dataset.labels[rows]):
        raise ValueError(f"Split {split!r} of {dataset.name} is empty ({len(dataset)} {base} "
                         "images).")
    return dataclasses.replace(dataset, images=dataset.images[rows],
                               labels=dataset.labels[rows], split=split)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] images to float32 in [-1, 1] (the range of a tanh generator)."""
    return images.astype(np.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# Deterministic batches


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int,
                  process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Indices of this process's share of global batch `step`; a pure function of its arguments.

    Each epoch is a fresh permutation drawn from (seed, epoch); the remainder of an epoch that does
    not fill a batch is dropped. On several processes the global batch is split in contiguous
    equal shares, process `i` taking the i-th.
    """
    if batch_size > num_examples:
        raise ValueError(f"batch size {batch_size} exceeds the {num_examples} examples available.")
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes.")
    steps_per_epoch = num_examples // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    global_idx = epoch_permutation(num_examples, seed, epoch)[
        position * batch_size:(position + 1) * batch_size]
    share = batch_size // process_count
    return global_idx[process_index * share:(process_index + 1) * share]
