"""The trainable TFLite file of the global model's architecture, for devices without TensorFlow.

Built from the aggregator's own Keras model (``build_trainable_tflite``: builtin ops only, the
task's batch size), so the model is defined once. Building takes seconds of TensorFlow
conversion (5.5 s for the digits CNN), so it is built when a device that trains with it is first
online, once per architecture (at the start, and again after structured pruning changed the
architecture); a fleet of Keras devices never pays for it. An architecture the builder refuses
is logged once, with the layer it names; devices without TensorFlow then cannot train it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from fedprune.converters.model_messages import TrainableModel, encode_trainable_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainableFile:
    """The outcome of building one architecture's trainable file: the message to publish, or why
    there is none."""

    architecture_digest: str
    batch_size: int
    message: bytes | None  # the encoded TrainableModel frame
    refusal: str = ""  # why it cannot be built (names the layer), when message is None
    size_bytes: int = 0  # the TFLite file's size
    build_s: float = 0.0


class TrainableFiles:
    """Builds, and remembers, the trainable file of each architecture the global model has had."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._built: dict[tuple[str, tuple[bool, ...]], TrainableFile] = {}

    def get(self, model: Any, architecture_digest: str, masked: Sequence[bool]) -> TrainableFile:
        """The file of ``model`` (whose architecture is ``architecture_digest``) with masks on the
        tensors ``masked`` flags; built on the first call for that architecture."""
        key = (architecture_digest, tuple(bool(m) for m in masked))
        if key not in self._built:
            self._built[key] = self._build(model, architecture_digest, key[1])
        return self._built[key]

    def _build(self, model: Any, digest: str, masked: tuple[bool, ...]) -> TrainableFile:
        from fedprune.converters.trainable_tflite import UnsupportedModel, build_trainable_tflite

        start = time.perf_counter()
        try:
            content = build_trainable_tflite(model, masked, self.batch_size)
        except UnsupportedModel as e:
            log.warning("devices without TensorFlow cannot train architecture %s: %s; only devices with the Keras "
                        "trainer will be selected", digest[:8], e)
            return TrainableFile(digest, self.batch_size, None, refusal=str(e))
        build_s = time.perf_counter() - start
        message = encode_trainable_model(TrainableModel(digest, self.batch_size, content))
        log.info("built the trainable TFLite file of architecture %s for batches of %d: %d bytes (%d on the wire) "
                 "in %.1f s", digest[:8], self.batch_size, len(content), len(message), build_s)
        return TrainableFile(digest, self.batch_size, message, size_bytes=len(content), build_s=build_s)
