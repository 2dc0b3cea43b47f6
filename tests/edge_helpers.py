"""Helpers for the device-side tests (and scripts/bench_trust.py): a digits task as the aggregator
would send it, its data, and a module an attacker would name in a forged architecture."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from fedprune.converters.protocol import Architecture, TrainTask

# A module an attacker names: importing it, or calling its function, leaves a marker file.
MARKER_MODULE = """
import pathlib
pathlib.Path({marker!r} + ".imported").touch()
def run(*args, **kwargs):
    pathlib.Path({marker!r} + ".called").touch()
    return args[0] if args else None
class Boom:
    @classmethod
    def from_config(cls, config):
        run()
"""


def digits_arrays(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    order = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[order], d.target[order].astype(np.int64)


def write_digits_npz(path: Path, n: int = 400, seed: int = 0) -> Path:
    x, y = digits_arrays(n, seed)
    np.savez(path, x_train=x, y_train=y)
    return path


def small_mlp_task(sparsity: float = 0.8, round_: int = 1, seed: int = 0, epochs: int = 1,
                   deadline_s: float = 120.0) -> tuple[Architecture, TrainTask]:
    """An 8x8 digits MLP (TensorFlow-free to build: the Keras JSON is written by hand), with its
    hidden kernel pruned to ``sparsity`` by magnitude, as round ``round_``'s task."""
    import json

    layers = [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 8, 8, 1], "dtype": "float32",
                                                "name": "input"}},
        {"class_name": "Flatten", "config": {"name": "flatten", "dtype": "float32"}},
        {"class_name": "Dense", "config": {"name": "dense1", "units": 64, "activation": "relu", "dtype": "float32",
                                           "use_bias": True}},
        {"class_name": "Dense", "config": {"name": "logits", "units": 10, "activation": "linear",
                                           "dtype": "float32", "use_bias": True}},
    ]
    model_json = json.dumps({"class_name": "Sequential", "config": {"name": "mlp", "layers": layers},
                             "keras_version": "2.21.0", "backend": "tensorflow"})
    shapes = [[64, 64], [64], [64, 10], [10]]
    names = ["dense1/kernel", "dense1/bias", "logits/kernel", "logits/bias"]
    arch = Architecture(model_json, hashlib.sha256(model_json.encode()).hexdigest()[:32], shapes, names)
    rng = np.random.default_rng(seed + round_)
    weights = [rng.normal(0, 0.2, s).astype(np.float32) if len(s) == 2 else np.zeros(s, np.float32) for s in shapes]
    k = weights[0]
    mask = np.abs(k) > np.quantile(np.abs(k), sparsity)
    weights[0] = k * mask
    task = TrainTask(round=round_, attempt=1, architecture_digest=arch.digest, weights=weights,
                     masks=[mask, None, None, None],
                     training={"local_epochs": epochs, "batch_size": 16, "optimizer": "adam", "learning_rate": 0.01},
                     uplink_precision="int8", deadline_s=deadline_s, session="test")
    return arch, task


def training_child_pid(state_dir: Path) -> int | None:
    """The pid of the training child working in ``state_dir``, if one is running."""
    needle = str(state_dir / "work").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"fedprune.edge_agent.train_worker" in cmdline and needle in cmdline:
                return int(entry.name)
    return None


def wait_for(predicate, timeout_s: float, what: str, log: Path | None = None):
    """Poll ``predicate`` until it returns something true (returned); fail naming ``what``,
    with the end of ``log``, after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")
