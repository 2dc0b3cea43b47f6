"""The trained model as sparse TFLite files, and the TFLite latency of a model."""

from __future__ import annotations

import logging
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.data import Dataset
from fedprune.quiet_start import quiet_requested, stderr_filtered

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "int8")


def export_models(model: Any, weights: list[np.ndarray], run_dir: Path, dataset: Dataset) -> list[dict]:
    """Write ``model-float32.tflite`` and ``model-int8.tflite`` of ``model`` with ``weights`` into
    ``run_dir``, each run with LiteRT on the held-out set; one summary entry per file."""
    from fedprune.converters.tflite_export import export_sparse_tflite
    from fedprune.models import set_layer_weights

    set_layer_weights(model, weights)
    out = []
    for precision in PRECISIONS:
        # The converter's and LiteRT's notes on stderr, and the converter's warning that int8
        # inputs have no statistics (the model's inputs stay float32), are not for the user.
        with stderr_filtered() if quiet_requested() else nullcontext(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            result = export_sparse_tflite(model, run_dir / f"model-{precision}.tflite", precision=precision,
                                          representative_x=dataset.x_test, eval_x=dataset.x_test,
                                          eval_y=dataset.y_test)
        out.append({"path": str(result.path), "precision": precision, "size_bytes": result.size_bytes,
                    "accuracy": result.accuracy, "runtime": result.runtime}
                   | ({"granularity": result.granularity} if result.granularity else {}))
        log.info("wrote %s (%d bytes, TFLite accuracy %.4f on %s)", result.path, result.size_bytes,
                 result.accuracy or float("nan"), result.runtime)
    return note_sizes(out)


def note_sizes(exports: list[dict]) -> list[dict]:
    """Add a ``note`` to an int8 export that is not smaller than the float32 one, and log it.

    For a small model the int8 file carries a scale and zero point per tensor (per channel for
    convolutions), quantize and dequantize operators, and sparse index arrays that quantization
    does not shrink: on breast cancer's MLP the int8 file was 14,080 bytes and the float32 one
    10,436, and nothing said so.
    """
    sizes = {e["precision"]: e["size_bytes"] for e in exports}
    if "int8" in sizes and "float32" in sizes and sizes["int8"] >= sizes["float32"]:
        note = (f"not smaller than float32 ({sizes['int8']:,} B against {sizes['float32']:,} B): for a model this "
                "small, int8's quantization parameters, operators and sparse indices outweigh its smaller weights; "
                "use the float32 file")
        for e in exports:
            if e["precision"] == "int8":
                e["note"] = note
        log.warning("model-int8.tflite is %s", note)
    return exports


def latency_ms(model: Any, weights: list[np.ndarray], x: np.ndarray) -> float:
    """Milliseconds per inference of ``model`` with ``weights`` as a float32 TFLite model on
    samples of ``x`` (median of 200 runs)."""
    from fedprune.converters.tflite_export import export_sparse_tflite
    from fedprune.models import set_layer_weights
    from fedprune.pruning.structured import measure_latency_ms

    set_layer_weights(model, weights)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_sparse_tflite(model, Path(tmp) / "m.tflite")
        return float(measure_latency_ms(exported.path, x[:50], runs=200))
