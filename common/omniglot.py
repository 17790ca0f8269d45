"""Omniglot (Lake et al., 2015) as one compact array: every character's drawings, resized.

`load_omniglot(data_dir, cache_dir, size)` returns an `Omniglot` whose `images` are uint8
[characters, drawings, size, size], ink = 255 on background 0, characters in a fixed order
(background set, then evaluation set; alphabets and characters sorted by name). Sources, in order:

1. the cache: `<cache_dir>/omniglot_<size>_<fingerprint>.npz`, written on the first load (the
   fingerprint covers the archives' names and sizes, so a different archive never reads a stale
   cache; an unreadable cache is rebuilt);
2. the original archives `images_background.zip` and `images_evaluation.zip` in `data_dir`
   (`<alphabet>/characterNN/NNNN_DD.png`, 105x105 1-bit PNGs), decoded once and resized with
   Lanczos filtering;
3. tensorflow-datasets' `omniglot` (train + test), when installed and available offline.

Missing archives raise `DataNotFoundError` naming every place looked; an archive that is not a zip,
or a PNG that does not decode, raises `CorruptDataError` naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import zipfile

import numpy as np

from common.data import CorruptDataError, DataNotFoundError

ARCHIVES = ("images_background.zip", "images_evaluation.zip")
IMAGE_SIZE = 28
_PNG = re.compile(r"(?:^|/)([^/]+)/([^/]+)/([^/]+\.png)$")


@dataclasses.dataclass(frozen=True)
class Omniglot:
    images: np.ndarray  # uint8 [characters, drawings, size, size], ink 255
    alphabets: np.ndarray  # str [characters]
    characters: np.ndarray  # str [characters], "<alphabet>/<characterNN>"
    source: str

    @property
    def num_characters(self) -> int:
        return self.images.shape[0]


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                        "l2gl", "omniglot")


def _resize(png: bytes, size: int) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(png)) as image:
        grey = image.convert("L")
        if grey.size != (size, size):
            grey = grey.resize((size, size), Image.LANCZOS)
        return 255 - np.asarray(grey, np.uint8)


def read_archive(path: str, size: int = IMAGE_SIZE) -> dict[str, list[np.ndarray]]:
    """{"<alphabet>/<character>": [drawing images sorted by file name]} from one Omniglot zip."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CorruptDataError(f"{path}: not a readable zip archive ({e}). Re-download it.") from e
    characters: dict[str, list[tuple[str, np.ndarray]]] = {}
    with archive:
        for name in sorted(archive.namelist()):
            match = _PNG.search(name)
            if not match:
                continue
            alphabet, character, file = match.groups()
            try:
                image = _resize(archive.read(name), size)
            except Exception as e:  # PIL and zlib raise many types on damaged members
                raise CorruptDataError(
                    f"{path}: member {name} does not decode as an image "
                    f"({type(e).__name__}: {e}). Re-download the archive.") from e
            characters.setdefault(f"{alphabet}/{character}", []).append((file, image))
    if not characters:
        raise CorruptDataError(f"{path}: no <alphabet>/<character>/<drawing>.png images inside.")
    return {k: [im for _, im in sorted(v, key=lambda fv: fv[0])] for k, v in characters.items()}


def _stack(characters: dict[str, list[np.ndarray]], source: str) -> Omniglot:
    counts = {len(v) for v in characters.values()}
    if len(counts) != 1:
        raise CorruptDataError(f"{source}: characters have different numbers of drawings "
                               f"({sorted(counts)}); every Omniglot character has 20.")
    names = list(characters)
    return Omniglot(images=np.stack([np.stack(characters[n]) for n in names]),
                    alphabets=np.array([n.split("/")[0] for n in names]),
                    characters=np.array(names), source=source)


def _fingerprint(paths: list[str], size: int) -> str:
    h = hashlib.sha1(str(size).encode())
    for p in paths:
        h.update(f"{os.path.basename(p)}:{os.path.getsize(p)}".encode())
    return h.hexdigest()[:12]


def _read_cache(path: str) -> Omniglot | None:
    try:
        with np.load(path) as f:
            return Omniglot(f["images"], f["alphabets"], f["characters"], f"cache:{path}")
    except Exception:  # a partial or damaged cache is rebuilt
        return None


def _write_cache(path: str, data: Omniglot) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez_compressed(tmp, images=data.images, alphabets=data.alphabets,
                        characters=data.characters)
    os.replace(tmp, path)


def load_archives(data_dir: str, cache_dir: str | None = None, size: int = IMAGE_SIZE,
                  archives: tuple[str, ...] = ARCHIVES) -> Omniglot:
    """All characters of `archives` in `data_dir`, through the cache in `cache_dir`."""
    paths = [os.path.join(data_dir, a) for a in archives]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataNotFoundError(f"Omniglot archives missing: {', '.join(missing)}.")
    cache = os.path.join(cache_dir or default_cache_dir(),
                         f"omniglot_{size}_{_fingerprint(paths, size)}.npz")
    if os.path.exists(cache) and (cached := _read_cache(cache)) is not None:
        return cached
    characters: dict[str, list[np.ndarray]] = {}
    for p in paths:
        characters.update(read_archive(p, size))
    data = _stack(characters, ", ".join(paths))
    try:
        _write_cache(cache, data)
    except OSError:  # a read-only cache directory only costs the decoding next time
        pass
    return data


def load_tfds_omniglot(size: int = IMAGE_SIZE, data_dir: str | None = None) -> Omniglot:
    """tensorflow-datasets' `omniglot` train + test splits (no download), grouped by character."""
    import tensorflow_datasets as tfds
    from PIL import Image

    characters: dict[str, list[np.ndarray]] = {}
    for split in ("train", "test"):
        ds = tfds.as_numpy(tfds.load("omniglot", split=split, data_dir=data_dir, download=False))
        for ex in ds:
            grey = Image.fromarray(np.asarray(ex["image"])[..., 0]).resize((size, size),
                                                                        Image.LANCZOS)
            key = f"{split}{int(ex['alphabet']):02d}/character{int(ex['alphabet_char_id']):02d}"
            characters.setdefault(key, []).append(255 - np.asarray(grey, np.uint8))
    return _stack(dict(sorted(characters.items())), "tensorflow_datasets:omniglot")


def load_omniglot(data_dir: str | None = None, cache_dir: str | None = None,
                  size: int = IMAGE_SIZE) -> Omniglot:
    """Omniglot from `data_dir`'s archives (cached), else tensorflow-datasets; see module doc."""
    looked = []
    if data_dir:
        try:
            return load_archives(data_dir, cache_dir, size)
        except DataNotFoundError as e:
            looked.append(f"--data_dir={data_dir}: {e}")
    else:
        looked.append("no --data_dir given")
    try:
        return load_tfds_omniglot(size)
    except ImportError:
        looked.append("tensorflow-datasets: not installed")
    except Exception as e:  # tfds raises many types when data is absent and offline
        looked.append(f"tensorflow-datasets 'omniglot': {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}")
    raise DataNotFoundError(
        "Omniglot not found. Looked in:\n  - " + "\n  - ".join(looked) + "\nPut "
        f"{' and '.join(ARCHIVES)} (github.com/brendenlake/omniglot/python) in a directory and "
        "pass --data_dir, or let tensorflow-datasets download `omniglot` online.")
