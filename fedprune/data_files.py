"""The data users have, besides ``.npz``: a CSV table with a named label column, and a folder of
images in the layout Keras' ``image_dataset_from_directory`` reads (one subfolder per class).

Both give ``(x, y)`` as float32 samples and int64 class ids, or a ``DataError`` that names the file
(and the row and column, or the image) and what to do. Both read the aggregator's held-out set and
a device's ``--data``; neither needs TensorFlow (images are decoded with Pillow).

CSV: a header row; every column but the label column is a numeric feature, in the header's order;
the label column holds integer class ids from 0 (the same ids on every device: map class names to
ids before, the same way everywhere). Empty cells are refused: fill in or drop missing values first.

Image folders: ``root/<class>/<image>`` with ``.png``, ``.jpg``, ``.jpeg``, ``.bmp`` or ``.gif``
files (other files are skipped, as Keras skips them); class ids by sorted folder name, as Keras
numbers them, so an empty folder keeps a class's id on a device without images of it. Pixels are
scaled to [0, 1] (Keras leaves 0-255); ``color_mode`` "rgb" gives 3 channels, "grayscale" 1;
``image_size`` resizes (bilinear, as Keras), else every image must have the first one's size.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DataError", "DataOptions", "IMAGE_SUFFIXES", "read_csv_xy", "read_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")  # what image_dataset_from_directory reads
_MAX_IMAGE_PIXELS = 50_000_000  # one image; more is a decompression bomb, not a training sample


class DataError(ValueError):
    """Data that cannot be used; the message says what is wrong with it (``fedprune.data``'s)."""


@dataclass(frozen=True)
class DataOptions:
    """What the user's file formats need to be read: the task's ``[data]`` keys, or a device's
    config (``device.label_column``, ``device.image_size``, ``device.color_mode``)."""

    label_column: str = "label"  # CSV
    image_size: tuple[int, int] | None = None  # image folders: (height, width) to resize to
    color_mode: str = "rgb"  # image folders: "rgb" or "grayscale"


def read_csv_xy(path: str | Path, label_column: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """The samples and labels of a CSV file (see the module's docstring)."""
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise DataError(f"{p}: {size:,} bytes, more than the {max_bytes:,} allowed here")
    with open(p, newline="", encoding="utf-8-sig") as f:
        try:
            rows = list(csv.reader(f))
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{p}: not a readable CSV file ({e})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{p}: empty; a CSV needs a header row naming its columns, then one sample per row")
    header = [name.strip() for name in rows[0]]
    if label_column not in header:
        raise DataError(f"{p}: no column named {label_column!r} in the header {header}; name the label column "
                        "there, or set the label column (task: [data] label_column; agent: --label-column)")
    if len(rows) < 2:
        raise DataError(f"{p}: a header and no samples")
    label_at = header.index(label_column)
    x = np.empty((len(rows) - 1, len(header) - 1), np.float32)
    y = np.empty(len(rows) - 1, np.int64)
    for n, row in enumerate(rows[1:]):
        line = n + 2  # the file's own line numbers: the header is line 1
        if len(row) != len(header):
            raise DataError(f"{p}, row {line}: {len(row)} cells, the header has {len(header)}")
        values = [_number(p, line, header[i], cell) for i, cell in enumerate(row)]
        y[n] = _class_id(p, line, label_column, row[label_at], values[label_at])
        x[n] = values[:label_at] + values[label_at + 1:]
    return x, y


def _number(p: Path, line: int, column: str, cell: str) -> float:
    text = cell.strip()
    try:
        value = float(text)
    except ValueError:
        what = "empty (fill in or drop missing values first)" if not text else f"{text[:40]!r} is not a number"
        raise DataError(f"{p}, row {line}, column {column!r}: {what}") from None
    if not math.isfinite(value):
        raise DataError(f"{p}, row {line}, column {column!r}: {text!r} is not a finite number")
    return value


def _class_id(p: Path, line: int, column: str, cell: str, value: float) -> int:
    if value < 0 or value != int(value):
        raise DataError(f"{p}, row {line}, column {column!r}: {cell.strip()!r} is not a class id (an integer from 0; "
                        "map class names to ids the same way on every device)")
    return int(value)


def read_image_folder(path: str | Path, options: DataOptions, max_bytes: int
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images, their class ids and the class names of an image folder (see the module's docstring)."""
    root = Path(path)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders; put each class's images in a folder of its own "
                        f"({root}/<class name>/<image>.png), as Keras' image_dataset_from_directory reads them")
    files = [(f, label) for label, name in enumerate(classes)
             for f in sorted((root / name).iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{root}: no images in its class folders {classes} (read: {', '.join(IMAGE_SUFFIXES)})")
    first = _decode(files[0][0], options, None)
    if first.nbytes * len(files) > max_bytes:
        raise DataError(f"{root}: {len(files):,} images of {first.shape} unpack to {first.nbytes * len(files):,} "
                        f"bytes, more than the {max_bytes:,} allowed here; set image_size smaller")
    x = np.empty((len(files), *first.shape), np.float32)
    x[0] = first
    for i, (f, _) in enumerate(files[1:], start=1):
        x[i] = _decode(f, options, first.shape)
    return x, np.array([label for _, label in files], np.int64), classes


def _decode(path: Path, options: DataOptions, shape: tuple[int, ...] | None) -> np.ndarray:
    """One image as float32 in [0, 1], (height, width, channels); ``shape``: what it must be."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{path.parent.parent}: reading a folder of images needs Pillow: pip install pillow "
                        "(32-bit Raspberry Pi OS: sudo apt-get install python3-pil)") from None
    try:
        with Image.open(path) as image:  # reads the header only: the size is known before decoding
            if image.width * image.height > _MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: {image.width}x{image.height} pixels, more than the {_MAX_IMAGE_PIXELS:,} "
                                "one training image may have")
            image = image.convert("L" if options.color_mode == "grayscale" else "RGB")
            if options.image_size is not None:
                height, width = options.image_size
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if shape is not None and pixels.shape != shape:
        raise DataError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels, the first image has "
                        f"{shape[1]}x{shape[0]}; give every image one size, or set image_size to resize them")
    return pixels
