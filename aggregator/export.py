"""The trained model as sparse TFLite files, and the TFLite latency of a model."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.data import Dataset

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
        result = export_sparse_tflite(
            model,
            run_dir / f"model-{precision}.tflite",
            precision=precision,
            representative_x=dataset.x_test,
            eval_x=dataset.x_test,
            eval_y=dataset.y_test,
        )
        out.append({"path": str(result.path), "precision": precision, "size_bytes": result.size_bytes,
                    "accuracy": result.accuracy, "runtime": result.runtime})
        log.info("wrote %s (%d bytes, TFLite accuracy %.4f on %s)", result.path, result.size_bytes,
                 result.accuracy or float("nan"), result.runtime)
    return out


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
