"""Tests for fedprune.data: built-in data sets, user .npz files and the split across devices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprune.data import DataError, load_dataset, load_device_data, load_npz, partition

PROP = settings(max_examples=200, deadline=None)


# --------------------------------------------------------------------------- built-in sets


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", test_fraction=0.2, seed=0)


def test_digits_shapes_dtypes_classes(digits):
    ds = digits
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.input_shape == (8, 8, 1)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == round(0.2 * 1797)
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
    assert ds.num_classes == 10
    assert set(np.unique(ds.y_train)) == set(range(10))
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0


def test_split_is_reproducible_and_seed_dependent(digits):
    again = load_dataset("digits", seed=0)
    assert np.array_equal(again.x_test, digits.x_test) and np.array_equal(again.y_train, digits.y_train)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.y_test, digits.y_test)


def test_breast_cancer_shapes_dtypes_classes():
    ds = load_dataset("breast_cancer", test_fraction=0.25, seed=3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.shape[1:] == (30,) and ds.input_shape == (30,)
    assert len(ds.x_train) + len(ds.x_test) == 569
    assert len(ds.x_test) == round(0.25 * 569)
    assert ds.num_classes == 2 and set(np.unique(ds.y_train)) == {0, 1}
    x = np.concatenate([ds.x_train, ds.x_test])
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4)  # standardized
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-3)


def test_unknown_dataset():
    with pytest.raises(DataError, match="mnist"):
        load_dataset("mnist")


# --------------------------------------------------------------------------- partition


def _check_cover(parts, n, min_samples):
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "an index is missing or repeated"
    assert np.array_equal(np.sort(allidx), np.arange(n))
    assert all(len(p) >= min_samples for p in parts)
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates inside a device


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("num_devices", [1, 7, 20])
def test_partition_covers_every_index_once(digits, method, num_devices):
    y = digits.y_train
    parts = partition(y, num_devices, method, alpha=0.5, shards_per_device=2, seed=4)
    assert len(parts) == num_devices
    _check_cover(parts, len(y), 2)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_partition_reproducible_and_seed_dependent(digits, method):
    y = digits.y_train
    a = partition(y, 10, method, alpha=0.5, seed=11)
    b = partition(y, 10, method, alpha=0.5, seed=11)
    c = partition(y, 10, method, alpha=0.5, seed=12)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(len(p) == len(q) and np.array_equal(p, q) for p, q in zip(a, c))


@PROP
@given(
    n=st.integers(2, 200),
    num_classes=st.integers(1, 6),
    num_devices=st.integers(1, 12),
    method=st.sampled_from(["iid", "dirichlet", "shards"]),
    alpha=st.floats(0.3, 10.0),
    spd=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_property(n, num_classes, num_devices, method, alpha, spd, seed):
    y = np.random.default_rng(seed).integers(0, num_classes, size=n)
    try:
        parts = partition(y, num_devices, method, alpha=alpha, shards_per_device=spd, seed=seed)
    except DataError:
        # allowed only when the request is impossible (or Dirichlet keeps starving a device)
        assert n < 2 * num_devices or method in ("dirichlet", "shards")
        if method == "shards" and n >= 2 * num_devices:
            assert num_devices * spd > n
        return
    assert len(parts) == num_devices
    _check_cover(parts, n, 2)


def _mean_label_entropy(y, parts, num_classes):
    ents = []
    for p in parts:
        counts = np.bincount(y[p], minlength=num_classes).astype(float)
        q = counts / counts.sum()
        q = q[q > 0]
        ents.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ents))


def test_dirichlet_small_alpha_is_more_skewed_than_iid(digits):
    y = digits.y_train
    iid = _mean_label_entropy(y, partition(y, 10, "iid", seed=0), 10)
    skewed = _mean_label_entropy(y, partition(y, 10, "dirichlet", alpha=0.1, seed=0), 10)
    broad = _mean_label_entropy(y, partition(y, 10, "dirichlet", alpha=100.0, seed=0), 10)
    shards = _mean_label_entropy(y, partition(y, 10, "shards", shards_per_device=2, seed=0), 10)
    assert iid > 0.9 * np.log(10)
    assert skewed < iid - 0.5
    assert broad > skewed
    assert shards < iid - 0.5


def test_partition_errors():
    y = np.arange(10) % 2
    with pytest.raises(DataError, match="devices"):
        partition(y, 6, "iid")  # 10 samples cannot give 6 devices 2 each
    with pytest.raises(DataError):
        partition(y, 0, "iid")
    with pytest.raises(DataError, match="unknown partition"):
        partition(y, 2, "random")
    with pytest.raises(DataError, match="shards"):
        partition(y, 4, "shards", shards_per_device=3)  # 12 shards > 10 samples
    with pytest.raises(DataError, match="Dirichlet"):
        partition(np.zeros(20, int), 10, "dirichlet", alpha=0.01, min_samples=2)
    assert [len(p) for p in partition(y, 5, "iid")] == [2] * 5


def test_shards_respect_min_samples():
    try:
        parts = partition(np.arange(6), 2, "shards", shards_per_device=2, seed=1, min_samples=3)
    except DataError:
        return
    assert min(len(p) for p in parts) >= 3, [len(p) for p in parts]


# --------------------------------------------------------------------------- .npz files


def test_load_npz_valid_with_and_without_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((40, 5)).astype(np.float64)
    y = rng.integers(0, 3, 40)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=x, y_train=y)
    ds = load_npz(p, test_fraction=0.25, seed=1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert len(ds.x_train) == 30 and len(ds.x_test) == 10 and ds.num_classes == int(y.max()) + 1
    assert load_dataset("npz", str(p)).x_train.shape[1:] == (5,)

    q = tmp_path / "e.npz"
    np.savez(q, x_train=x, y_train=y, x_test=x[:7], y_test=np.full(7, 4))
    ds = load_npz(q)
    assert len(ds.x_train) == 40 and len(ds.x_test) == 7 and ds.num_classes == 5


def _npz(tmp_path, name="f.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("loader", [load_npz, load_device_data])
def test_npz_errors(tmp_path, loader):
    x = np.ones((4, 3))
    with pytest.raises(DataError, match="x_train"):
        loader(_npz(tmp_path, "a.npz", X=x, y_train=np.arange(4)))
    with pytest.raises(DataError, match="4 samples but 3 labels"):
        loader(_npz(tmp_path, "b.npz", x_train=x, y_train=np.arange(3)))
    with pytest.raises(DataError, match="integer class ids"):
        loader(_npz(tmp_path, "c.npz", x_train=x, y_train=np.array([0.0, 1.5, 2.0, 1.0])))
    with pytest.raises(DataError, match="integer class ids"):
        loader(_npz(tmp_path, "c2.npz", x_train=x, y_train=np.array([0.0, np.nan, 2.0, 1.0])))
    with pytest.raises(DataError, match="NaN or Inf"):
        loader(_npz(tmp_path, "d.npz", x_train=np.array([[1.0, np.nan]] * 4), y_train=np.arange(4)))
    with pytest.raises(DataError, match=">= 0"):
        loader(_npz(tmp_path, "e.npz", x_train=x, y_train=np.array([0, 1, -1, 2])))
    with pytest.raises(DataError, match="sample axis"):
        loader(_npz(tmp_path, "f.npz", x_train=np.arange(4.0), y_train=np.arange(4)))
    with pytest.raises(DataError, match="not found"):
        loader(tmp_path / "missing.npz")


def test_device_data_float_integer_labels_and_channel_axis(tmp_path):
    x = np.random.default_rng(0).random((6, 28, 28))  # keras.datasets.mnist layout
    y = np.array([[0.0], [1.0], [2.0], [9.0], [3.0], [3.0]])  # float, integral, (n, 1)
    xs, ys = load_device_data(_npz(tmp_path, x_train=x, y_train=y))
    assert xs.shape == (6, 28, 28, 1) and xs.dtype == np.float32
    assert ys.dtype == np.int64 and ys.tolist() == [0, 1, 2, 9, 3, 3]
    np.testing.assert_allclose(xs[..., 0], x.astype(np.float32))
    ds = load_npz(tmp_path / "f.npz", test_fraction=0.5)
    assert ds.x_train.shape[1:] == (28, 28, 1)


@pytest.mark.parametrize("case", ["junk-device", "npy-device", "npy-npz", "strings-device", "strings-npz"])
def test_unreadable_files_raise_data_error(tmp_path, case):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file")
    npy = tmp_path / "arr.npy"
    np.save(npy, np.zeros((3, 2)))
    strings = _npz(tmp_path, "s.npz", x_train=np.array([["a", "b"], ["c", "d"]]), y_train=np.array([0, 1]))
    loader, path = {
        "junk-device": (load_device_data, junk),
        "npy-device": (load_device_data, npy),
        "npy-npz": (load_npz, npy),
        "strings-device": (load_device_data, strings),
        "strings-npz": (load_npz, strings),
    }[case]
    try:
        loader(path)
    except DataError:
        pass
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(e).__name__} escaped: {e}")


# --------------------------------------------------------------------------- sizes checked before loading


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()  # the magic, the version, the header


def _zip(path, members: dict[str, bytes], compression=None) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w", compression if compression is not None else zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_a_decompression_bomb_is_refused_before_it_is_unpacked(tmp_path):
    """80 MB of zeros deflate to about 80 kB: refused from the zip header, in a process whose
    memory stays that of Python and NumPy."""
    import subprocess
    import sys
    import zipfile

    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x_train.npy", "w") as f:
            f.write(_npy_header((20_000, 1000)))
            for _ in range(20):
                f.write(bytes(4_000_000))
        z.writestr("y_train.npy", _npy_header((20_000,), "<i8") + bytes(160_000))
    assert bomb.stat().st_size < 1_000_000
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (TensorFlow-sized) parent.
    code = ("from fedprune.data import DataError, load_device_data\n"
            f"try:\n    load_device_data({str(bomb)!r})\nexcept DataError as e:\n    print(e)\n"
            "from fedprune.edge_agent.budgets import peak_rss_mb\nprint(int(peak_rss_mb()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert "a decompression bomb rather than data" in out[0] and "80,000,128" in out[0]
    assert int(out[1]) < 150, f"peak RSS {out[1]} MB"


def test_declared_sizes_must_fit_the_limit_and_the_bytes_that_are_there(tmp_path):
    from fedprune.data import read_npy, read_npz

    x = np.ones((100, 10), np.float32)
    _npz(tmp_path, "ok.npz", x_train=x, y_train=np.arange(100))
    assert read_npz(tmp_path / "ok.npz", max_bytes=10_000)["x_train"].shape == (100, 10)
    with pytest.raises(DataError, match="unpack to 5,056 bytes, more than the 1,000 allowed"):
        read_npz(tmp_path / "ok.npz", max_bytes=1_000)
    lying = tmp_path / "lying.npz"  # a small member whose array header declares 40 TB
    _zip(lying, {"x_train.npy": _npy_header((10**12, 10)) + bytes(400)})
    with pytest.raises(DataError, match=r"declares \(1000000000000, 10\) float32 .* but only 400 bytes follow"):
        read_npz(lying)
    objects = tmp_path / "objects.npz"
    _zip(objects, {"x_train.npy": _npy_header((2,), "|O") + bytes(16)})
    with pytest.raises(DataError, match="Python objects"):
        read_npz(objects)
    huge = tmp_path / "huge.npy"
    huge.write_bytes(_npy_header((2**62, 2**62)) + bytes(16))
    with pytest.raises(DataError, match="declares"):
        read_npy(huge)
    long_header = tmp_path / "long_header.npy"
    long_header.write_bytes(b"\x93NUMPY\x01\x00" + (20_000).to_bytes(2, "little") + b"{" + b" " * 19_999)
    with pytest.raises(DataError, match="bad .npy header") as info:
        read_npy(long_header)
    assert "\n" not in str(info.value)
