"""Data readers on IDX files the test writes, on the real files when present, and batch order."""

import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from common import data
from tests.conftest import FASHION_MNIST_DIR, shared_data


def _write_idx(path, array, compress=True):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I",
                                                                       *array.shape)
    raw = header + array.tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(raw)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:3], compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:3], compress=False)
    return tmp_path, images, labels


def test_idx_files_round_trip(idx_dir):
    directory, images, labels = idx_dir
    train = data.load("mnist", "train", str(directory))
    assert train.images.shape == (7, 28, 28, 1) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images[..., 0], images)
    np.testing.assert_array_equal(train.labels, labels.astype(np.int32))
    test = data.load("kmnist", "test", str(directory))  # uncompressed files are read too
    np.testing.assert_array_equal(test.images[..., 0], images[:3])


def test_split_slices_take_the_rows_of_their_split(idx_dir):
    directory, images, labels = idx_dir
    head = data.load("mnist", "train[:5]", str(directory))
    tail = data.load("mnist", "train[5:]", str(directory))
    np.testing.assert_array_equal(head.images[..., 0], images[:5])
    np.testing.assert_array_equal(tail.labels, labels[5:].astype(np.int32))
    assert (head.split, tail.split) == ("train[:5]", "train[5:]")
    with pytest.raises(ValueError, match=r"Split 'test\[5:\]' of mnist is empty \(3 test"):
        data.load("mnist", "test[5:]", str(directory))
    with pytest.raises(ValueError, match="a slice of one such as 'test"):
        data.load("mnist", "test[a:b]", str(directory))


def test_a_truncated_file_is_reported_by_name(idx_dir):
    directory, _, _ = idx_dir
    path = directory / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(data.CorruptDataError, match="train-images-idx3-ubyte.gz.*truncated"):
        data.load("mnist", "train", str(directory))
    path.write_bytes(path.read_bytes()[:50])  # a cut gzip stream
    with pytest.raises(data.CorruptDataError, match="train-images-idx3-ubyte.gz"):
        data.load("mnist", "train", str(directory))
    path.write_bytes(gzip.compress(b"not an idx file at all"))
    with pytest.raises(data.CorruptDataError, match="bad magic number"):
        data.load("mnist", "train", str(directory))


def test_a_missing_dataset_names_every_place_looked(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataNotFoundError) as error:
        data.load("kmnist", "train", str(missing))
    message = str(error.value)
    assert f"--data_dir={missing}: no such directory" in message
    assert "tensorflow-datasets" in message and "--data_dir" in message


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="choose one of mnist, fashion_mnist, kmnist, digits"):
        data.load("cifar100", "train")
    with pytest.raises(ValueError, match="choose 'train' or 'test'"):
        data.load("digits", "validation")


def test_real_mnist_test_digits():
    directory = os.path.dirname(shared_data("mnist", "t10k-images-idx3-ubyte.gz"))
    test = data.load("mnist", "test", directory)
    assert test.images.shape == (10000, 28, 28, 1)
    # The first ten MNIST test labels, and the well-known class counts of the test set.
    np.testing.assert_array_equal(test.labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    np.testing.assert_array_equal(np.bincount(test.labels),
                                  [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


def test_real_fashion_mnist_from_the_debian_package():
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip(f"{FASHION_MNIST_DIR} absent: `apt-get install dataset-fashion-mnist`")
    train = data.load("fashion_mnist", "train")  # found without --data_dir
    test = data.load("fashion_mnist", "test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    assert train.source == FASHION_MNIST_DIR


def test_digits_are_sklearns_resized_with_a_fixed_split():
    from sklearn.datasets import load_digits
    train, test = data.load("digits", "train"), data.load("digits", "test")
    assert train.images.shape == (1497, 28, 28, 1) and test.images.shape == (300, 28, 28, 1)
    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))  # the documented split
    np.testing.assert_array_equal(test.labels, bunch.target[order[:300]])
    np.testing.assert_array_equal(train.labels, bunch.target[order[300:]])
    first = Image.fromarray((bunch.images[order[0]] * (255 / 16)).astype(np.uint8))
    np.testing.assert_array_equal(test.images[0, ..., 0],
                                  np.asarray(first.resize((28, 28), Image.BICUBIC)))
    assert train.images.max() > 200  # 16 on sklearn's scale maps to 255
    np.testing.assert_array_equal(data.load("digits", "test").labels, test.labels)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = [data.batch_indices(100, 32, seed=3, step=s) for s in range(7)]
    b = [data.batch_indices(100, 32, seed=3, step=s) for s in range(7)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # Within an epoch (3 batches of 32 out of 100) no example repeats.
    epoch0 = np.concatenate(a[:3])
    assert len(set(epoch0.tolist())) == 96
    assert not np.array_equal(a[0], a[3])  # the next epoch is another permutation
    assert not np.array_equal(a[0], data.batch_indices(100, 32, seed=4, step=0))


def test_each_process_reads_its_own_share_of_the_global_batch():
    whole = data.batch_indices(60, 12, seed=0, step=4)
    shares = [data.batch_indices(60, 12, seed=0, step=4, process_index=i, process_count=3)
              for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(shares), whole)
    with pytest.raises(ValueError, match="not divisible by 5 processes"):
        data.batch_indices(60, 12, seed=0, step=0, process_count=5)


def test_tensorflow_datasets_is_the_fallback_and_its_arrays_are_converted(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds
    calls = {}

    def fake_load(name, split, batch_size, data_dir, download):
        calls.update(name=name, split=split, batch_size=batch_size, download=download)
        return {"image": np.ones((5, 28, 28, 1), np.uint8) * 7, "label": np.arange(5)}

    monkeypatch.setattr(tfds, "load", fake_load)
    monkeypatch.setattr(tfds, "as_numpy", lambda tree: tree)
    dataset = data.load("kmnist", "test", str(tmp_path))  # no IDX files there
    assert calls == {"name": "kmnist", "split": "test", "batch_size": -1, "download": False}
    assert dataset.source == "tensorflow_datasets:kmnist" and dataset.images.dtype == np.uint8
    np.testing.assert_array_equal(dataset.labels, np.arange(5, dtype=np.int32))


def test_a_data_dir_without_the_data_is_named_when_the_data_comes_from_elsewhere(
        tmp_path, caplog):
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip(f"{FASHION_MNIST_DIR} absent: `apt-get install dataset-fashion-mnist`")
    empty = tmp_path / "empty"
    empty.mkdir()
    for data_dir, problem in ((tmp_path / "typo", "no such directory"),
                              (empty, "no t10k-images-idx3-ubyte")):
        caplog.clear()
        test = data.load("fashion_mnist", "test", str(data_dir))
        assert test.source == FASHION_MNIST_DIR
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"--data_dir={data_dir}: {problem}")
        assert warnings[0].endswith(f"loaded fashion_mnist (test) from {FASHION_MNIST_DIR} "
                                    "instead.")
    caplog.clear()
    data.load("fashion_mnist", "test")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
