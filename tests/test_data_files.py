"""The data users have: a CSV with a named label column and a folder of images (one subfolder
per class), for the aggregator's held-out set (``LOADERS``) and a device's ``--data``; each bad
file refused with a message that names the file (and the row and column, or the image)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedprune.data import FILE_LOADERS, LOADERS, DataError, load_dataset, load_device_data
from fedprune.data_files import DataOptions
from fedprune.task import TaskError, load_task, parse_task

CSV = """age,pressure,label,score
41,120.5,1,0.3
35,110,0,0.1
62,140,1,0.9
29,105.25,0,0.2
"""


def test_a_csv_gives_numeric_features_in_header_order_and_class_ids(tmp_path):
    path = tmp_path / "clinic.csv"
    path.write_text(CSV)
    x, y = load_device_data(path)  # device: the default label column, "label"
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (4, 3)
    np.testing.assert_array_equal(x[0], np.float32([41, 120.5, 0.3]))
    assert y.tolist() == [1, 0, 1, 0]
    ds = load_dataset("csv", str(path), 0.25, 0)  # the aggregator's held-out set: a quarter split off
    assert (len(ds.x_train), len(ds.x_test), ds.num_classes, ds.input_shape) == (3, 1, 2, (3,))
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(CSV.replace("label", "outcome"))
    x2, y2 = load_device_data(renamed, DataOptions(label_column="outcome"))
    assert np.array_equal(x2, x) and np.array_equal(y2, y)


@pytest.mark.parametrize("text,expected", [
    (CSV.replace("35,110,0", "35,abc,0"), "row 3, column 'pressure': 'abc' is not a number"),
    (CSV.replace("35,110,0", "35,,0"), "row 3, column 'pressure': empty (fill in or drop missing values first)"),
    (CSV.replace("62,140,1,0.9", "62,140,1"), "row 4: 3 cells, the header has 4"),
    (CSV.replace("29,105.25,0", "29,105.25,1.5"), "row 5, column 'label': '1.5' is not a class id"),
    (CSV.replace("29,105.25,0", "29,105.25,-1"), "row 5, column 'label': '-1' is not a class id"),
    (CSV.replace("41,120.5,1", "41,inf,1"), "row 2, column 'pressure': 'inf' is not a finite number"),
    (CSV.replace("label", "diagnosis"), "no column named 'label' in the header ['age', 'pressure', 'diagnosis', 'score']"),
    ("age,label\n", "a header and no samples"),
    ("\n\n", "empty; a CSV needs a header row"),
])
def test_a_bad_csv_is_refused_naming_the_row_and_column(tmp_path, text, expected):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    for read in (lambda: load_device_data(path), lambda: load_dataset("csv", str(path))):
        with pytest.raises(DataError) as info:
            read()
        assert str(info.value).startswith(str(path)) and expected in str(info.value), str(info.value)


def _images(root, classes, size=(6, 5), mode="RGB", per_class=3, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            channels = 3 if mode == "RGB" else 1
            pixels = rng.integers(0, 256, (size[0], size[1], channels), dtype=np.uint8)
            Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode).save(root / name / f"{i}.png")
    return root


def test_an_image_folder_gives_class_ids_by_sorted_folder_name(tmp_path):
    root = _images(tmp_path / "photos", ["dog", "cat", "bird"])
    (root / "cat" / "notes.txt").write_text("not an image: skipped, as Keras skips it")
    (root / "empty-class").mkdir()  # keeps its id on a device that has no images of it
    x, y = load_device_data(root)
    assert x.shape == (9, 6, 5, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert sorted(set(y.tolist())) == [0, 1, 2]  # bird, cat, dog; "empty-class" is id 3
    assert y.tolist()[:3] == [0, 0, 0]
    ds = load_dataset("images", str(root), 0.34, 0)
    assert ds.num_classes == 4 and ds.input_shape == (6, 5, 3) and len(ds.x_test) == 3
    gray = load_device_data(root, DataOptions(image_size=(4, 4), color_mode="grayscale"))[0]
    assert gray.shape == (9, 4, 4, 1)


def test_a_bad_image_folder_is_refused_naming_the_image(tmp_path):
    root = _images(tmp_path / "a", ["x", "y"])
    (root / "y" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg: not a readable image"):
        load_device_data(root)
    (root / "y" / "broken.jpg").unlink()
    _images(root, ["y"], size=(7, 5), per_class=1, seed=1)  # y/0.png is now another size
    with pytest.raises(DataError, match=r"y/0\.png: 5x7 pixels, the first image has 5x6; .* set image_size"):
        load_device_data(root)
    assert load_device_data(root, DataOptions(image_size=(6, 5)))[0].shape == (6, 6, 5, 3)  # resized: fine
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_device_data(empty)
    (empty / "a").mkdir()
    with pytest.raises(DataError, match="no images in its class folders"):
        load_dataset("images", str(empty))
    with pytest.raises(DataError, match="image folder not found"):
        load_dataset("images", str(tmp_path / "nowhere"))


def test_the_formats_are_registered_and_the_task_file_names_their_keys(tmp_path):
    assert {"npz", "csv", "images"} <= set(LOADERS) and FILE_LOADERS == {"npz", "csv", "images"}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clinic.csv").write_text(CSV.replace("label", "outcome"))
    task_file = tmp_path / "task.toml"
    task_file.write_text('[data]\ndataset = "csv"\npath = "data/clinic.csv"\nlabel_column = "outcome"\n')
    task = load_task(task_file)
    assert task.data.path == str(tmp_path / "data" / "clinic.csv")  # relative to the task file
    ds = load_dataset(task.data.dataset, task.data.path, 0.25, 0, task.data.options)
    assert ds.input_shape == (3,)
    with pytest.raises(TaskError, match="data.path is required when data.dataset = 'images'"):
        parse_task({"data": {"dataset": "images"}})
    with pytest.raises(TaskError, match=r"data.image_size must be a list of 2 values"):
        parse_task({"data": {"dataset": "images", "path": "x", "image_size": [32]}})
    assert parse_task({"data": {"dataset": "images", "path": "x", "image_size": [32, 24]}}).data.image_size == (32, 24)


def test_reading_an_image_folder_on_a_device_loads_no_tensorflow(tmp_path):
    root = _images(tmp_path / "photos", ["a", "b"])
    code = ("import sys\nfrom fedprune.data import load_device_data\n"
            f"x, y = load_device_data({str(root)!r})\n"
            "assert x.shape == (6, 6, 5, 3)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
