"""The model files the aggregator publishes retained for devices: the current architecture's
trainable TFLite file (for devices that train without TensorFlow) and, after the last round, the
final exported models that every device installs.

Retained, so that a device that joins (or reconnects) later still gets them; an earlier run's are
cleared at the start, since a device joining this run must not install them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedprune.aggregator.device_publisher import DevicePublisher
from fedprune.aggregator.selection import DeviceSelection
from fedprune.aggregator.trainable_file import TrainableFile, TrainableFiles
from fedprune.converters.model_messages import FINAL_PRECISIONS, FinalModel, encode_final_model
from fedprune.converters.protocol import Topics

log = logging.getLogger(__name__)


class DeviceModelFiles:
    """Publishes, signed, the trainable file when a device that needs it is online, and the final
    models."""

    def __init__(self, publisher: DevicePublisher, topics: Topics, selection: DeviceSelection, batch_size: int) -> None:
        self.publisher, self.topics, self.selection = publisher, topics, selection
        self.files = TrainableFiles(batch_size)
        self.current: TrainableFile | None = None  # the current architecture's, once built

    def clear_earlier_run(self) -> None:
        """Clear an earlier run's final models and trainable file (maybe for another batch size)."""
        for topic in (*map(self.topics.final_model, FINAL_PRECISIONS), self.topics.trainable_model):
            self.publisher.clear(topic)

    def republish(self, architecture_digest: str) -> None:
        """The trainable file again, if built for this architecture (on a (re)connection: a
        restarted broker has forgotten it)."""
        trainable = self.current
        if trainable is not None and trainable.message is not None \
                and trainable.architecture_digest == architecture_digest:
            self.publisher.publish_retained(self.topics.trainable_model, trainable.message)

    def trainable(self, model: Any, architecture_digest: str, masks: list) -> TrainableFile | None:
        """The architecture's trainable file when a device that needs it is online (built and
        published the first time), else None."""
        if not self.selection.wants_trainable_file():
            return None
        trainable = self.files.get(model, architecture_digest, [m is not None for m in masks])
        if trainable is not self.current:
            self.current = trainable
            if trainable.message is not None:
                self.publisher.publish_retained(self.topics.trainable_model, trainable.message)
        return trainable

    def publish_final(self, exports: list[dict], completed_round: int, final_sparsity: float,
                      architecture_digest: str, issued_us: int | None = None) -> None:
        """The exported files of the final global model, retained, so that every device (also one
        that joins later) installs the model the report describes. ``issued_us``: when (a device
        refuses a final model issued before the newest it took: an earlier run's, replayed)."""
        for export in exports:
            message = FinalModel(completed_round, export["precision"], final_sparsity, export["accuracy"],
                                 architecture_digest, Path(export["path"]).read_bytes(), issued_us)
            info = self.publisher.publish_retained(self.topics.final_model(export["precision"]),
                                                 encode_final_model(message))
            info.wait_for_publish(30)
            log.info("published the final model of round %d as %s TFLite (%d bytes, sha256 %s)", message.round,
                     message.precision, len(message.content), message.sha256[:12])
