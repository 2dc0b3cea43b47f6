"""The files through which the agent hands one round to its training child, and gets it back.

One folder per round (``<state dir>/work/``), every file written atomically:

======================  ======  ================================================================================
file                    writer  what
======================  ======  ================================================================================
``job.json``            agent   the architecture, the data path, what to export, which trainer, the parent's pid
``task.bin``            agent   the task, as the protocol encodes it (float32, so nothing is lost)
``trainable.tflite``    agent   the architecture's trainable TFLite file (the TensorFlow-free trainer only)
``result.npz``          child   the ``TrainResult``: delta, masks, metrics, gradients
``error.json``          child   why training failed, when it did
``model.tflite``        child   the task's global model as a sparse TFLite file (Keras only)
``export.json``         child   what ``model.tflite`` is (round, precision, sparsity, runtime)
``worker.log``          child   its stdout and stderr (TensorFlow's chatter)
======================  ======  ================================================================================

The task travels in its wire encoding, so there is one serialization of a task to trust; the
result in an ``.npz``. TensorFlow-free: both sides import this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedprune.converters.protocol import Architecture, TrainTask, decode_task, encode_task
from fedprune.data_files import DataOptions
from fedprune.edge_agent.device import TrainResult
from fedprune.fileio import atomic_write_bytes, atomic_write_json

JOB, TASK, RESULT, ERROR = "job.json", "task.bin", "result.npz", "error.json"
TRAINABLE = "trainable.tflite"
MODEL, EXPORT, LOG = "model.tflite", "export.json", "worker.log"

_MAX_TASK_BYTES = 1 << 31


@dataclass(frozen=True)
class JobSpec:
    """What the child needs besides the task."""

    data_path: str
    export_precision: str  # "int8" | "float32" | "off"
    skip_export_digest: str  # the installed model's source: no new export for the same weights
    parent_pid: int
    # "module:Class" layer classes the device's own config allows (fedprune.architecture)
    custom_layers: tuple[str, ...] = ()
    # "keras" (TensorFlow) or "litert" (the trainable TFLite file TRAINABLE, no TensorFlow)
    trainer: str = "keras"
    # How the data is read (fedprune.data_files.DataOptions): a .csv's label column; a folder of
    # images' size to resize to (empty: as they are) and colour mode
    label_column: str = "label"
    image_size: tuple[int, ...] = ()
    color_mode: str = "rgb"

    @property
    def data_options(self) -> DataOptions:
        return DataOptions(self.label_column, tuple(self.image_size) or None, self.color_mode)  # type: ignore[arg-type]


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """A short digest of a list of weight tensors (which global model a file was made from)."""
    h = hashlib.sha256()
    for w in weights:
        a = np.ascontiguousarray(w, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def write_job(folder: Path, architecture: Architecture, task: TrainTask, spec: JobSpec) -> None:
    lossless = dataclasses.replace(task, downlink_precision="float32")
    atomic_write_bytes(folder / TASK, encode_task(lossless, architecture.names))
    atomic_write_json(folder / JOB, {"architecture": json.loads(architecture.encode()),
                                     "spec": dataclasses.asdict(spec)})


def read_job(folder: Path) -> tuple[Architecture, TrainTask, JobSpec]:
    raw = json.loads((folder / JOB).read_text())
    architecture = Architecture.decode(json.dumps(raw["architecture"]).encode())
    task = decode_task((folder / TASK).read_bytes(), architecture.names, architecture.shapes, _MAX_TASK_BYTES)
    spec = raw["spec"]
    return architecture, task, JobSpec(**{**spec, "custom_layers": tuple(spec.get("custom_layers", ())),
                                          "image_size": tuple(spec.get("image_size", ()))})


def write_result(folder: Path, result: TrainResult) -> None:
    arrays: dict[str, Any] = {"metrics": np.frombuffer(json.dumps(result.metrics).encode(), np.uint8)}
    for i, d in enumerate(result.delta):
        arrays[f"delta_{i}"] = d
    for i, m in enumerate(result.masks):
        if m is not None:
            arrays[f"mask_{i}"] = m
    for name, tensors in (("grad", result.gradients), ("gmask", result.gradient_masks)):
        for i, t in enumerate(tensors or []):
            arrays[f"{name}_{i}"] = t
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(folder / RESULT, buf.getvalue())


def read_result(folder: Path, num_tensors: int) -> TrainResult:
    with np.load(folder / RESULT, allow_pickle=False) as f:
        def tensors(name: str) -> list[np.ndarray] | None:
            found = [f[f"{name}_{i}"] for i in range(num_tensors) if f"{name}_{i}" in f.files]
            return found if len(found) == num_tensors else None

        masks = [f[f"mask_{i}"] if f"mask_{i}" in f.files else None for i in range(num_tensors)]
        delta = tensors("delta")
        if delta is None:
            raise ValueError(f"{folder / RESULT} holds fewer than {num_tensors} delta tensors")
        return TrainResult(delta, masks, json.loads(f["metrics"].tobytes()), tensors("grad"), tensors("gmask"))


def write_error(folder: Path, message: str) -> None:
    atomic_write_json(folder / ERROR, {"error": message})


def read_error(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / ERROR).read_text())["error"])
    except (OSError, ValueError, KeyError):
        return None
