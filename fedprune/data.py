"""Data sets and their split across devices.

Built-in sets ship inside scikit-learn (no download): ``digits`` (1,797 8x8 images, 10 classes)
and ``breast_cancer`` (569 tabular medical records, 2 classes); ``mnist1d`` is generated locally
by the ``mnist1d`` package (5,000 sequences, 10 classes). A user's own data is an ``.npz``
with ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test`` (the ``keras.datasets`` layout),
a CSV with a label column (``csv``), or a folder of images, one subfolder per class (``images``):
see ``fedprune.data_files``. The class count is the largest label + 1.

``.npz`` and ``.npy`` files are read through :func:`read_npz` and :func:`read_npy`, which check
the sizes the files declare (each zip member's uncompressed size, each array's header) before
anything is decompressed or allocated: a 2.4 MB ``.npz`` of zeros declaring a 2.4 GB array took
an agent to 5.4 GB of resident memory when loaded as it came.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import numpy as np

from fedprune.data_files import DataError, DataOptions, read_csv_xy, read_image_folder

log = logging.getLogger(__name__)

# The most bytes an .npz or .npy may unpack to: this, or half the machine's memory if that is less.
MAX_DATA_BYTES = 8 << 30
# A large member that deflate shrank more than this is a decompression bomb, not data (real data
# sets compress a few times; an array of zeros about 1000 times). Stored (np.savez) members pass.
MAX_COMPRESSION_RATIO = 100
_RATIO_CHECKED_ABOVE = 64 << 20
_MAX_NPY_HEADER = 10_000  # numpy's own default


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, path: str = "", test_fraction: float = 0.2, seed: int = 0,
                 options: DataOptions = DataOptions()) -> Dataset:
    """Load the data set registered as ``name`` (``LOADERS``): a built-in one, or a user's file at
    ``path`` (read as ``options`` say); a held-out test set is split off (``test_fraction``) where
    the set has none."""
    loader = LOADERS.get(name)
    if loader is None:
        raise DataError(f"unknown data set {name!r}; use one of {sorted(LOADERS)}")
    return loader(path, test_fraction, seed, options)


def load_digits_set(path: str = "", test_fraction: float = 0.2, seed: int = 0,
                    options: DataOptions | None = None) -> Dataset:
    """scikit-learn's 1,797 8x8 digits as (n, 8, 8, 1) images in [0, 1], 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    return _split(x, d.target.astype(np.int64), test_fraction, seed)


def load_breast_cancer_set(path: str = "", test_fraction: float = 0.2, seed: int = 0,
                           options: DataOptions | None = None) -> Dataset:
    """scikit-learn's 569 breast-cancer records (30 features, standardized), 2 classes."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = d.data.astype(np.float32)
    # Standardize with statistics any device could be given; raw features span 5 decades.
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    return _split(x, d.target.astype(np.int64), test_fraction, seed)


def load_mnist1d(path: str = "", test_fraction: float = 0.2, seed: int = 0,
                 options: DataOptions | None = None) -> Dataset:
    """MNIST-1D (Greydanus, 2020), generated locally by the ``mnist1d`` package: 4,000 training and
    1,000 test sequences of 40 samples, 10 classes; shaped (n, 40, 1) for Conv1D models.

    Its own split is kept (``test_fraction`` is not used). ``get_dataset`` would download a
    pickle, so the generator is called.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("the mnist1d data set needs the 'mnist1d' package: pip install 'fedprune[aggregator]'") from None
    args = get_dataset_args()
    args.seed = 42  # the benchmark's canonical data; `seed` only affects partitions and training
    d = make_dataset(args)
    x, xt = (np.asarray(a, np.float32)[..., None] for a in (d["x"], d["x_test"]))
    y, yt = (np.asarray(a, np.int64) for a in (d["y"], d["y_test"]))
    return Dataset(x, y, xt, yt, 10)


def load_npz(path: str | Path, test_fraction: float = 0.2, seed: int = 0,
             options: DataOptions | None = None) -> Dataset:
    """Read a user's ``.npz`` (``x_train``, ``y_train``, optional ``x_test``, ``y_test``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    arrays = read_npz(p)
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise DataError(f"{p}: missing array {key!r}; found {sorted(arrays)}")
    x, y = _check_xy(arrays["x_train"], arrays["y_train"], f"{p}: x_train/y_train")
    if "x_test" in arrays and "y_test" in arrays:
        xt, yt = _check_xy(arrays["x_test"], arrays["y_test"], f"{p}: x_test/y_test")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{p}: x_test shape {xt.shape[1:]} differs from x_train {x.shape[1:]}")
        n_classes = int(max(y.max(), yt.max())) + 1
        return Dataset(x, y, xt, yt, n_classes)
    return _split(x, y, test_fraction, seed)


def load_csv(path: str | Path, test_fraction: float = 0.2, seed: int = 0,
             options: DataOptions | None = None) -> Dataset:
    """A user's CSV: a header row, numeric features, integer class ids in ``options.label_column``."""
    x, y = read_csv_xy(_existing(path), (options or DataOptions()).label_column, data_limit_bytes())
    return _split(*_check_xy(x, y, str(path)), test_fraction, seed)


def load_image_folder(path: str | Path, test_fraction: float = 0.2, seed: int = 0,
                      options: DataOptions | None = None) -> Dataset:
    """A user's folder of images, one subfolder per class (class ids by sorted folder name)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (a folder with one subfolder of images per class)")
    x, y, classes = read_image_folder(root, options or DataOptions(), data_limit_bytes())
    data = _split(*_check_xy(x, y, str(root)), test_fraction, seed)
    return dataclasses.replace(data, num_classes=max(data.num_classes, len(classes)))


def load_device_data(path: str | Path, options: DataOptions = DataOptions()) -> tuple[np.ndarray, np.ndarray]:
    """A device's local training data: a folder of images (one subfolder per class), a CSV with a
    label column, or ``x_train`` and ``y_train`` of an ``.npz``."""
    p = Path(path)
    if p.is_dir():
        x, y, _ = read_image_folder(p, options, data_limit_bytes())
        return _check_xy(x, y, str(p))
    if p.suffix.lower() == ".csv":
        return _check_xy(*read_csv_xy(_existing(p), options.label_column, data_limit_bytes()), str(p))
    arrays = read_npz(_existing(p))
    if "x_train" not in arrays or "y_train" not in arrays:
        raise DataError(f"{p}: needs arrays 'x_train' and 'y_train'; found {sorted(arrays)}")
    return _check_xy(arrays["x_train"], arrays["y_train"], f"{p}")


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    return p


def data_limit_bytes() -> int:
    """The most bytes a data file may unpack to here: ``MAX_DATA_BYTES``, or half of this
    machine's memory if that is less."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return MAX_DATA_BYTES
    return min(MAX_DATA_BYTES, memory // 2)


def read_npz(path: str | Path, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, after checking that each member's uncompressed size (its zip
    header) and each array's declared size (its ``.npy`` header) agree, and that together they
    stay within ``max_bytes`` (default :func:`data_limit_bytes`). ``DataError`` otherwise."""
    p = Path(path)
    limit = data_limit_bytes() if max_bytes is None else max_bytes
    try:
        with zipfile.ZipFile(p) as archive:
            members = archive.infolist()
            total = sum(m.file_size for m in members)
            if total > limit:
                raise DataError(f"{p}: its arrays unpack to {total:,} bytes, more than the {limit:,} allowed here")
            for member in members:
                if (member.file_size > _RATIO_CHECKED_ABOVE
                        and member.file_size > MAX_COMPRESSION_RATIO * max(member.compress_size, 1)):
                    raise DataError(f"{p}: array {member.filename!r} unpacks from {member.compress_size:,} to "
                                    f"{member.file_size:,} bytes, a decompression bomb rather than data (save "
                                    "real data that compresses this well with np.savez, uncompressed)")
                with archive.open(member) as f:
                    _check_npy_header(f, member.file_size, f"{p}: array {member.filename!r}")
    except zipfile.BadZipFile:
        if p.is_file() and p.read_bytes()[:6] == b"\x93NUMPY":
            raise DataError(f"{p}: is a single array (.npy), expected an .npz with x_train and y_train") from None
        raise DataError(f"{p}: not a readable .npz file (not a zip archive)") from None
    except (OSError, EOFError, ValueError, NotImplementedError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{p}: damaged .npz file ({_one_line(e)})") from None
    try:
        with np.load(p, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - a damaged zip member can raise many types
        raise DataError(f"{p}: damaged .npz file ({type(e).__name__}: {_one_line(e)})") from None


def read_npy(path: str | Path, max_bytes: int | None = None) -> np.ndarray:
    """The array of an ``.npy``, after checking its header's shape and type against the file's
    size and ``max_bytes`` (default :func:`data_limit_bytes`). ``DataError`` otherwise."""
    p = Path(path)
    limit = data_limit_bytes() if max_bytes is None else max_bytes
    try:
        size = p.stat().st_size
        if size > limit:
            raise DataError(f"{p}: {size:,} bytes, more than the {limit:,} allowed here")
        with open(p, "rb") as f:
            _check_npy_header(f, size, str(p))
        return np.load(p, allow_pickle=False)
    except DataError:
        raise
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{p}: not a readable .npy file ({_one_line(e)})") from None


def _check_npy_header(f: IO[bytes], size: int, what: str) -> None:
    """Read an ``.npy`` header from ``f`` (``size`` bytes in all) and check that the array it
    declares is a plain numeric one whose bytes are all there: none is allocated beyond them."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_NPY_HEADER)
        else:
            raise DataError(f"{what}: .npy format version {version} is not supported (1.0 and 2.0 are)")
    except DataError:
        raise
    except (ValueError, EOFError, SyntaxError) as e:
        raise DataError(f"{what}: bad .npy header ({_one_line(e)})") from None
    if dtype.hasobject:
        raise DataError(f"{what}: holds Python objects ({dtype}); only numeric arrays are read")
    declared = math.prod(shape) * dtype.itemsize
    if declared > size - f.tell():
        raise DataError(f"{what}: its header declares {shape} {dtype} ({declared:,} bytes) but only "
                        f"{size - f.tell():,} bytes follow")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _check_xy(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2:
        raise DataError(f"{what}: x must have a sample axis and features, got shape {x.shape}")
    y = np.asarray(y).reshape(-1)
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} samples but {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{what}: no samples")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{what}: labels must be integer class ids, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{what}: labels must be >= 0")
    try:
        x = x.astype(np.float32)
    except (ValueError, TypeError):
        raise DataError(f"{what}: x must be numeric, got dtype {x.dtype}") from None
    if x.ndim == 3:  # grayscale images without a channel axis, as in keras.datasets.mnist
        x = x[..., None]
    if not np.all(np.isfinite(x)):
        raise DataError(f"{what}: x contains NaN or Inf")
    return x, y.astype(np.int64)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], int(y.max()) + 1)


DataLoader = Callable[[str, float, int, DataOptions], Dataset]

#: name in a task file's ``[data] dataset`` -> ``loader(path, test_fraction, seed, options)``; a
#: new format is one function and one line here (docs/extending.md)
LOADERS: dict[str, DataLoader] = {
    "digits": load_digits_set,
    "breast_cancer": load_breast_cancer_set,
    "mnist1d": load_mnist1d,
    "npz": load_npz,
    "csv": load_csv,
    "images": load_image_folder,
}
#: The loaders that read a user's file or folder at ``[data] path``.
FILE_LOADERS = frozenset({"npz", "csv", "images"})


#: What the report and the log say of a fleet split with ``iid_with_replacement``.
SHARED_SAMPLES_NOTE = ("data split iid_with_replacement: devices share training samples (a scale test: "
                       "accuracy is not comparable with a federation of disjoint shards)")


def _sample_with_replacement(n: int, num_devices: int, per_device_min: int, seed: int) -> list[np.ndarray]:
    """``iid_with_replacement``: distinct samples within a device, shared across devices. Drawn
    for the whole fleet from ``seed``, so that every process of a simulation gives device ``i``
    the same samples."""
    per_device = max(per_device_min, n // num_devices)
    if per_device > n:
        raise DataError(f"{n} samples cannot give a device {per_device} distinct samples; lower data.min_samples")
    rng = np.random.default_rng(seed)
    # argpartition of random keys: ``per_device`` distinct indices per row, one call for the fleet
    # (10,000 devices of digits: 14 MB of keys at once, so in blocks).
    parts: list[np.ndarray] = []
    for start in range(0, num_devices, 1000):
        rows = min(1000, num_devices - start)
        keys = rng.random((rows, n))
        parts.extend(np.sort(row) for row in np.argpartition(keys, per_device - 1, axis=1)[:, :per_device])
    log.warning("%s: %d devices x %d samples drawn from %d", SHARED_SAMPLES_NOTE, num_devices, per_device, n)
    return parts


def partition(
    y: np.ndarray,
    num_devices: int,
    method: str = "iid",
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    min_samples: int = 2,
) -> list[np.ndarray]:
    """Split sample indices across devices; returns one index array per device.

    - ``iid``: a uniform random split.
    - ``dirichlet``: each class is spread over devices with proportions drawn from Dir(alpha)
      (Hsu et al., 2019); resampled until every device holds at least ``min_samples``.
    - ``shards``: sort by label, cut into ``num_devices * shards_per_device`` shards, deal each
      device ``shards_per_device`` of them (McMahan et al., 2017).
    - ``iid_with_replacement``: for scale tests of more devices than the data set has samples
      only: each device draws ``max(min_samples, len(y) // num_devices)`` distinct samples at
      random, independently of the others, so devices share samples (``SHARED_SAMPLES_NOTE``).
    """
    n = len(y)
    if num_devices < 1:
        raise DataError(f"num_devices must be >= 1, got {num_devices}")
    if method == "iid_with_replacement":
        return _sample_with_replacement(n, num_devices, min_samples, seed)
    if n < num_devices * min_samples:
        raise DataError(
            f"{n} samples cannot give {num_devices} devices {min_samples} samples each; "
            "use fewer devices or more data (or, for a scale test of the simulator only, "
            "partition = \"iid_with_replacement\": devices then share samples)"
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        return [np.sort(a) for a in np.array_split(rng.permutation(n), num_devices)]
    if method == "shards":
        n_shards = num_devices * shards_per_device
        if n_shards > n:
            raise DataError(f"{n_shards} shards requested but only {n} samples")
        order = np.argsort(y, kind="stable")
        shards = np.array_split(order, n_shards)
        deal = rng.permutation(n_shards).reshape(num_devices, shards_per_device)
        parts = [np.sort(np.concatenate([shards[s] for s in row])) for row in deal]
        if min(len(p) for p in parts) < min_samples:
            raise DataError(
                f"shards of {n} samples leave a device with fewer than {min_samples} samples; "
                "use fewer devices or shards_per_device"
            )
        return parts
    if method == "dirichlet":
        classes = np.unique(y)
        for _ in range(1000):
            parts: list[list[int]] = [[] for _ in range(num_devices)]
            for c in classes:
                idx = rng.permutation(np.flatnonzero(y == c))
                props = rng.dirichlet(np.full(num_devices, alpha))
                cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
                for d, chunk in enumerate(np.split(idx, cuts)):
                    parts[d].extend(chunk.tolist())
            if min(len(p) for p in parts) >= min_samples:
                return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
        raise DataError(
            f"Dirichlet(alpha={alpha}) left some device with fewer than {min_samples} samples "
            "after 1000 draws; raise alpha or use fewer devices"
        )
    raise DataError(f"unknown partition method {method!r}; use 'iid', 'dirichlet', 'shards' or "
                    "'iid_with_replacement' (scale tests only)")
