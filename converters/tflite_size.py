"""Bytes a small TFLite file does not need to carry: debug strings and per-channel quantization.

For a model of a few thousand weights the converter's bookkeeping outweighs the weights. Breast
cancer's 90 % sparse MLP exported as int8 was 14,080 bytes, of which 3.7 kB were weights and
sparse indices: per-channel quantization parameters (a float32 scale and an int64 zero point per
output channel, for every kernel and bias) took 6.9 kB, and tensor names and the converter's
metadata 0.9 kB. Per-tensor quantization and no debug strings made it 6,464 bytes at the same
accuracy (:func:`choose_int8_granularity` checks that it is the same).

Used by :func:`fedprune.converters.tflite_export.export_sparse_tflite`, which imports TensorFlow;
this module imports TensorFlow's flatbuffer tools only inside :func:`compact_flatbuffer`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Int8Granularity", "GranularityChoice", "choose_int8_granularity", "compact_flatbuffer"]

logger = logging.getLogger(__name__)

#: ``"auto"``: per-tensor when it is smaller and changes no more of the Keras model's predictions
#: than per-channel does (plus :data:`MAX_EXTRA_DISAGREEMENT`); otherwise per-channel.
Int8Granularity = Literal["auto", "per_channel", "per_tensor"]
INT8_GRANULARITIES: tuple[str, ...] = ("auto", "per_channel", "per_tensor")

#: Per-tensor may change at most this share of samples' top-1 prediction more than per-channel.
MAX_EXTRA_DISAGREEMENT = 0.005

#: Metadata entries the runtime never reads: the converter's record of its own options.
_DROPPED_METADATA = (b"CONVERSION_METADATA",)


def compact_flatbuffer(content: bytes) -> bytes:
    """The model without what the runtime never reads: its description, subgraph and tensor
    names, the converter's ``CONVERSION_METADATA``, and one empty buffer per tensor without data
    (every such tensor points at buffer 0, the schema's sentinel "for tensors without a buffer").

    Operators, weights, sparsity, quantization and signatures (their own names included, so
    ``get_signature_runner`` still works) are kept; unlike ``flatbuffer_utils.strip_strings``,
    which drops signatures.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    model.description = None
    model.metadata = [entry for entry in model.metadata or [] if entry.name not in _DROPPED_METADATA]
    for subgraph in model.subgraphs:
        subgraph.name = None
        for tensor in subgraph.tensors:
            tensor.name = None
    _drop_empty_buffers(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _drop_empty_buffers(model) -> None:  # type: ignore[no-untyped-def] - the schema's object API
    def has_data(index: int) -> bool:
        buffer = model.buffers[index]
        return (buffer.data is not None and len(buffer.data) > 0) or bool(getattr(buffer, "size", 0))

    users = [t for subgraph in model.subgraphs for t in subgraph.tensors] + list(model.metadata or [])
    kept = sorted({u.buffer for u in users if u.buffer and has_data(u.buffer)})
    new_index = {old: new for new, old in enumerate(kept, start=1)}
    for user in users:
        user.buffer = new_index.get(user.buffer, 0)
    model.buffers = [model.buffers[0]] + [model.buffers[i] for i in kept]


@dataclass(frozen=True)
class GranularityChoice:
    """Which int8 file :func:`choose_int8_granularity` kept, and why.

    Attributes:
        granularity: ``"per_channel"`` or ``"per_tensor"``.
        content: The kept file's bytes.
        disagreement: Share of samples whose top-1 prediction differs from the Keras model's,
            for each granularity compared (``{"per_channel": 0.0, "per_tensor": 0.0}``).
    """

    granularity: str
    content: bytes
    disagreement: dict[str, float]


def choose_int8_granularity(
    per_channel: bytes,
    per_tensor: bytes,
    keras_top1: np.ndarray,
    x: np.ndarray,
    max_extra_disagreement: float = MAX_EXTRA_DISAGREEMENT,
) -> GranularityChoice:
    """Keep the per-tensor file when it is smaller and as faithful to the Keras model as the
    per-channel one: its top-1 predictions on ``x`` differ from ``keras_top1`` on at most
    ``max_extra_disagreement`` more of the samples.

    Fidelity to the float model, not accuracy on labels, decides: the choice is about what
    quantization changed, and it must not tune the file to the held-out set that then measures it.
    """
    from fedprune.converters.tflite_export import load_interpreter, predict_tflite

    if len(per_tensor) >= len(per_channel):
        return GranularityChoice("per_channel", per_channel, {})
    disagreement = {}
    for name, content in (("per_channel", per_channel), ("per_tensor", per_tensor)):
        top1 = np.argmax(predict_tflite(load_interpreter(content).interpreter, x), axis=-1)
        disagreement[name] = float(np.mean(top1 != keras_top1))
    if disagreement["per_tensor"] <= disagreement["per_channel"] + max_extra_disagreement:
        kept = "per_tensor"
    else:
        kept = "per_channel"
    logger.info("int8 granularity: %s (%d B per-channel, %d B per-tensor; top-1 changed on %.2f %% / %.2f %% "
                "of %d samples)", kept, len(per_channel), len(per_tensor), 100 * disagreement["per_channel"],
                100 * disagreement["per_tensor"], len(x))
    return GranularityChoice(kept, per_tensor if kept == "per_tensor" else per_channel, disagreement)
