"""Task samplers and the Omniglot reader, on arrays and zips the tests write (and the real ones)."""

import io
import os
import zipfile

import numpy as np
import pytest

from common import omniglot
from common.data import CorruptDataError, DataNotFoundError
from maml import tasks
from tests.conftest import shared_data


def distinct_images(characters=10, drawings=6, size=28):
    """Images whose pixels encode (character, drawing), so identities can be read back."""
    images = np.zeros((characters, drawings, size, size), np.uint8)
    for c in range(characters):
        for d in range(drawings):
            images[c, d, 0, 0] = c + 1  # corner pixels mark the unrotated orientation
            images[c, d, 0, 1] = d + 1
    return images


def identify(image, images):
    """(character, drawing, rotation) of an episode image."""
    for r in range(4):
        unrotated = np.rot90(image, -r)
        c, d = int(unrotated[0, 0]) - 1, int(unrotated[0, 1]) - 1
        if 0 <= c < len(images) and 0 <= d < images.shape[1] and \
                np.array_equal(unrotated, images[c, d]):
            return c, d, r
    raise AssertionError("image not from the set")


def test_episode_sampler_properties():
    images = distinct_images()
    ways, shots, queries = 5, 2, 3
    batch = tasks.episodes(images, seed=3, step=7, num_tasks=4, ways=ways, shots=shots,
                           queries=queries)
    assert batch["support"]["x"].shape == (4, ways * shots, 28, 28, 1)
    assert batch["query"]["x"].shape == (4, ways * queries, 28, 28, 1)
    rotations = set()
    for t in range(4):
        seen_classes = {}
        used = set()
        for part, n in (("support", shots), ("query", queries)):
            xs = np.rint(batch[part]["x"][t, ..., 0] * 255).astype(np.uint8)
            ys = batch[part]["y"][t]
            np.testing.assert_array_equal(np.bincount(ys, minlength=ways), [n] * ways)
            for x, y in zip(xs, ys):
                c, d, r = identify(x, images)
                rotations.add(r)
                assert seen_classes.setdefault(int(y), (c, r)) == (c, r), "label maps to 1 class"
                assert (c, d) not in used, "a drawing is used once per episode"
                used.add((c, d))
        assert len({c for c, _ in seen_classes.values()}) == ways, "N distinct characters"
    assert rotations == {0, 1, 2, 3}
    again = tasks.episodes(images, seed=3, step=7, num_tasks=4, ways=ways, shots=shots,
                           queries=queries)
    np.testing.assert_array_equal(again["query"]["x"], batch["query"]["x"])
    other = tasks.episodes(images, seed=3, step=8, num_tasks=4, ways=ways, shots=shots,
                           queries=queries)
    assert not np.array_equal(other["support"]["x"], batch["support"]["x"])
    plain = tasks.episodes(images, 0, 0, 8, ways, 1, 1, rotate=False)
    assert all(identify(np.rint(x[..., 0] * 255).astype(np.uint8), images)[2] == 0
               for x in plain["support"]["x"].reshape(-1, 28, 28, 1))


def test_episode_sampler_rejects_impossible_requests():
    images = distinct_images(characters=2, drawings=4)
    with pytest.raises(ValueError, match="characters"):
        tasks.episodes(images, 0, 0, 1, ways=3, shots=1, queries=1)
    with pytest.raises(ValueError, match="drawings"):
        tasks.episodes(images, 0, 0, 1, ways=2, shots=3, queries=2)


def test_character_split_is_the_papers_and_seeded():
    train, test = tasks.character_split(1623, seed=0)
    assert len(train) == 1200 and len(test) == 423
    assert not set(train) & set(test) and len(set(train) | set(test)) == 1623
    np.testing.assert_array_equal(train, tasks.character_split(1623, seed=0)[0])
    assert not np.array_equal(train, tasks.character_split(1623, seed=1)[0])


def test_sinusoid_sampler():
    batch, info = tasks.sinusoid_tasks(0, 5, 200, 10, 3)
    assert batch["support"]["x"].shape == (200, 10, 1)
    assert 0.1 <= info["amplitude"].min() and info["amplitude"].max() <= 5
    assert 0 <= info["phase"].min() and info["phase"].max() <= np.pi
    x, y = batch["query"]["x"], batch["query"]["y"]
    assert np.abs(x).max() <= 5
    np.testing.assert_allclose(y, info["amplitude"][:, None, None]
                               * np.sin(x - info["phase"][:, None, None]), rtol=1e-5, atol=1e-6)
    again, _ = tasks.sinusoid_tasks(0, 5, 200, 10, 3)
    np.testing.assert_array_equal(again["support"]["y"], batch["support"]["y"])


def write_tiny_archive(path, characters=(("Alpha", 2), ("Beta", 1)), drawings=3):
    """An Omniglot-layout zip: 105x105 1-bit PNGs, ink (black) in a character-specific square."""
    from PIL import Image
    with zipfile.ZipFile(path, "w") as archive:
        index = 0
        for alphabet, count in characters:
            for c in range(count):
                index += 1
                for d in range(drawings):
                    image = np.ones((105, 105), bool)
                    image[10 * index:10 * index + 30, 5 * d:5 * d + 40] = False
                    buffer = io.BytesIO()
                    Image.fromarray(image).convert("1").save(buffer, "PNG")
                    archive.writestr(f"images_x/{alphabet}/character{c + 1:02d}/"
                                     f"{index:04d}_{d + 1:02d}.png", buffer.getvalue())
    return path


def test_reads_a_tiny_archive_and_caches_it(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_tiny_archive(data_dir / "images_background.zip")
    write_tiny_archive(data_dir / "images_evaluation.zip", characters=(("Gamma", 1),))
    cache = tmp_path / "cache"
    data = omniglot.load_omniglot(str(data_dir), str(cache))
    assert data.images.shape == (4, 3, 28, 28) and data.images.dtype == np.uint8
    assert list(data.characters) == ["Alpha/character01", "Alpha/character02",
                                     "Beta/character01", "Gamma/character01"]
    # Ink is bright; the ink square of character i, drawing d, resized by 28/105.
    scale = 28 / 105
    for i, c in enumerate((1, 2, 3, 1)):
        for d in range(3):
            rows, cols = np.nonzero(data.images[i, d] > 128)
            assert abs(rows.mean() - (10 * c + 15) * scale) < 1
            assert abs(cols.mean() - (5 * d + 20) * scale) < 1
    assert data.images[0, 0, 27, 27] == 0
    [cached] = os.listdir(cache)
    again = omniglot.load_omniglot(str(data_dir), str(cache))
    assert again.source.startswith("cache:")
    np.testing.assert_array_equal(again.images, data.images)
    (cache / cached).write_bytes(b"garbage")  # a damaged cache is rebuilt
    np.testing.assert_array_equal(omniglot.load_omniglot(str(data_dir), str(cache)).images,
                                  data.images)


def test_missing_and_corrupt_archives_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(omniglot, "load_tfds_omniglot", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("offline")))
    with pytest.raises(DataNotFoundError, match="images_background.zip"):
        omniglot.load_omniglot(str(tmp_path), str(tmp_path / "cache"))
    (tmp_path / "images_background.zip").write_bytes(b"not a zip")
    write_tiny_archive(tmp_path / "images_evaluation.zip")
    with pytest.raises(CorruptDataError, match="images_background.zip"):
        omniglot.load_omniglot(str(tmp_path), str(tmp_path / "cache"))
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as archive:
        archive.writestr("images_background/A/character01/0001_01.png", b"\x89PNG broken")
    with pytest.raises(CorruptDataError, match="0001_01.png"):
        omniglot.load_omniglot(str(tmp_path), str(tmp_path / "cache"))


def test_reads_the_real_archive():
    path = shared_data("omniglot", "images_background_small1.zip")
    characters = omniglot.read_archive(path)
    assert len(characters) == 136
    assert all(len(v) == 20 for v in characters.values())
    first = np.stack(next(iter(characters.values())))
    assert first.shape == (20, 28, 28) and first.dtype == np.uint8
    ink = (first > 128).mean()
    assert 0.02 < ink < 0.4, f"ink fraction {ink}: strokes should be bright on a dark ground"
    if os.path.exists(shared_data("omniglot", "images_evaluation.zip")):
        with zipfile.ZipFile(shared_data("omniglot", "images_background.zip")) as archive:
            pngs = [n for n in archive.namelist() if n.endswith(".png")]
        assert len(pngs) == 19280
