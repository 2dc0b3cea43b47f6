"""Run the device's current model: ``Predictor`` and the input files ``fedprune-agent predict`` reads.

The runtime is LiteRT (``ai-edge-litert``) where it is installed, else ``tflite-runtime``, else
TensorFlow's ``tf.lite`` interpreter (the only one that imports TensorFlow). A sparse int8 model
that LiteRT's default XNNPACK delegate refuses is run by its builtin kernels instead
(:func:`fedprune.converters.tflite_export.load_interpreter`); ``Predictor.runtime`` and
``Predictor.delegates`` say what ran. Each model file is first loaded and run once in a child
process (:mod:`fedprune.edge_agent.model_check`), so a file that crashes or hangs the runtime is
an error, not the end of the caller.

    >>> p = Predictor("/var/lib/fedprune/state/model")   # the agent's model folder
    >>> classes, probabilities = p.classify(x)
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from fedprune.converters.tflite_export import RUNTIMES, load_interpreter, predict_tflite
from fedprune.data import DataError, read_npy, read_npz
from fedprune.edge_agent.model_check import check_tflite
from fedprune.edge_agent.model_store import ModelInfo, ModelStore

log = logging.getLogger(__name__)


class InputError(ValueError):
    """An input file that cannot be fed to the model; the message says why."""


class Predictor:
    """The current model of a model folder (or one ``.tflite`` file), ready to run.

    ``reload_if_changed()`` picks up a model the agent installed since: a long-running service
    calls it between requests; the swap is atomic, so it never reads a half-written file.
    """

    def __init__(self, model: str | Path, *, runtimes: tuple[str, ...] = RUNTIMES,
                 num_threads: int | None = None) -> None:
        self.source = Path(model)
        self.runtimes = tuple(runtimes)
        self.num_threads = num_threads
        self._store = ModelStore(self.source) if self.source.is_dir() else None
        if self._store is None and not self.source.is_file():
            raise FileNotFoundError(f"no model folder or .tflite file at {self.source} (the agent creates "
                                    "<state dir>/model when it installs its first model)")
        self._load()

    def _load(self) -> None:
        if self._store is not None:
            data, self.info = self._store.read_current()
            self._stamp = _stamp(self._store.current_path)
        else:
            data, self.info = self.source.read_bytes(), None
            self._stamp = _stamp(self.source)
        # A bad file crashes or hangs the runtime: let it do so in a child first (once per file).
        check_tflite(data, self.runtimes, self.num_threads, what=str(self.source))
        loaded = load_interpreter(data, self.num_threads, self.runtimes)
        self._interpreter = loaded.interpreter
        self.runtime, self.delegates = loaded.runtime, loaded.delegates
        detail = self._interpreter.get_input_details()[0]
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in detail["shape"][1:])
        log.info("loaded %s (%s) in %s, %s", self.source,
                 f"round {self.info.round}" if self.info else "a file", self.runtime, self.delegates)

    @property
    def model_info(self) -> ModelInfo | None:
        """The manifest entry of the loaded model (None for a plain ``.tflite`` file)."""
        return self.info

    def reload_if_changed(self) -> bool:
        """Load the model again if the file was replaced since; True if it was."""
        path = self._store.current_path if self._store is not None else self.source
        if _stamp(path) == self._stamp:
            return False
        self._load()
        return True

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The model's raw outputs (logits for fedprune's models), one row per sample.

        ``x`` has shape ``(n, *input_shape)``; a flat ``(n, prod(input_shape))`` batch (a CSV
        row per sample) is reshaped.
        """
        return predict_tflite(self._interpreter, self.shape_batch(np.asarray(x, np.float32)))

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(classes, probabilities)``: argmax and softmax of :meth:`predict`."""
        logits = self.predict(x)
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = z / z.sum(axis=-1, keepdims=True)
        return np.argmax(logits, axis=-1), probabilities

    def latency_ms(self, x: np.ndarray, repeats: int = 50) -> float:
        """Median milliseconds for one sample (the first of ``x``), after a warm-up run."""
        one = self.shape_batch(np.asarray(x, np.float32))[:1]
        predict_tflite(self._interpreter, one)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict_tflite(self._interpreter, one)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1000)

    def shape_batch(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 1:
            x = x[None]
        if tuple(x.shape[1:]) == self.input_shape:
            return x
        if int(np.prod(x.shape[1:])) == int(np.prod(self.input_shape)):
            return x.reshape((len(x), *self.input_shape))
        raise InputError(f"samples have shape {tuple(x.shape[1:])}, the model expects {self.input_shape} "
                         f"({int(np.prod(self.input_shape))} values per sample)")


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def load_inputs(path: str | Path, key: str | None = None) -> np.ndarray:
    """Samples from a ``.npy``, an ``.npz`` (array ``key``, else ``x``, ``x_test`` or
    ``x_train``, else its only array) or a ``.csv`` (one sample per row, comma-separated, an
    optional header row)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            x = read_npy(p)  # sizes checked before anything is allocated
        elif suffix == ".npz":
            arrays = read_npz(p)
            names = list(arrays)
            if key is None:
                key = next((k for k in ("x", "x_test", "x_train") if k in names), None)
                if key is None and len(names) == 1:
                    key = names[0]
            if key not in names:
                raise InputError(f"{p}: no array {key!r}; it holds {names} (choose one with --key)")
            x = arrays[key]
        elif suffix == ".csv":
            x = _read_csv(p)
        else:
            raise InputError(f"{p}: unknown input format {suffix!r}; use .npy, .npz or .csv")
    except InputError:
        raise
    except DataError as e:
        raise InputError(str(e)) from None
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{p}: not a readable {suffix} file ({' '.join(str(e).split())[:300]})") from None
    if not np.issubdtype(x.dtype, np.number):
        raise InputError(f"{p}: inputs must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise InputError(f"{p}: inputs contain NaN or Inf")
    return x


def _read_csv(p: Path) -> np.ndarray:
    with open(p, encoding="utf-8") as f:
        first = f.readline()
    try:
        [float(v) for v in first.split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header row
    return np.loadtxt(p, delimiter=",", skiprows=skip, dtype=np.float32, ndmin=2)
