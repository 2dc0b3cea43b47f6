"""Installing the final global model that the aggregator publishes after the last round.

The message carries the very file the run's report describes (``model-int8.tflite`` or
``model-float32.tflite``), checked against its SHA-256 when decoded. Like every model file, it is
loaded and run once in a child process (:mod:`fedprune.edge_agent.model_check`) before it is
trusted, then installed through the model store, so ``fedprune-agent predict`` runs it. A device
without TensorFlow cannot export a round's global model itself: this is how its model changes.
"""

from __future__ import annotations

import logging

from fedprune.converters.model_messages import FinalModel
from fedprune.converters.tflite_export import RUNTIMES
from fedprune.edge_agent.model_check import ModelCheckError, check_tflite
from fedprune.edge_agent.model_store import ModelInfo, ModelStore, ModelStoreError
from fedprune.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


def install_final_model(store: ModelStore, model: FinalModel, runtimes: tuple[str, ...] = RUNTIMES) -> ModelInfo | None:
    """Check ``model``'s file in a child and make it the store's current model; None (nothing
    changed) when it is the current model already or the runtime refuses it (logged)."""
    current = store.current()
    if current is not None and current.sha256 == model.sha256:
        log.info("the final model of round %d is installed already", model.round)
        return None
    try:
        ran = check_tflite(model.content, runtimes, what=f"the final model of round {model.round}")
    except ModelCheckError as e:
        log.error("not installing the final model: %s", e)
        return None
    staged = store.directory / ".final-incoming.tflite"  # a dot file: a crash's leftover goes when a writer opens
    atomic_write_bytes(staged, model.content)
    info = ModelInfo(round=model.round, precision=model.precision, sparsity=model.sparsity, sha256=model.sha256,
                     runtime=" ".join(filter(None, (ran.get("runtime"), f"({ran['delegates']})"
                                                    if ran.get("delegates") else ""))),
                     final=True)
    try:
        installed = store.install(staged, info)
    except (OSError, ModelStoreError) as e:
        staged.unlink(missing_ok=True)
        log.error("could not install the final model of round %d: %s", model.round, e)
        return None
    log.info("installed the final model of round %d (%s, aggregator's held-out accuracy %s)", model.round,
             model.precision, "n/a" if model.accuracy is None else f"{model.accuracy:.4f}")
    return installed
