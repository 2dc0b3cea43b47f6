"""TensorBoard event files for a run: ``tensorboard --logdir runs/`` shows a federation the way it
shows a Keras fit, one point per round.

Written with ``tf.summary.write`` (TensorFlow is loaded on the aggregator anyway) into the run
folder itself, so each run folder is one run in TensorBoard's list. TensorFlow 2.21 no longer
installs the ``tensorboard`` package, and ``tf.summary.scalar`` is its code: each scalar is written
the way it writes one (a float32 tensor tagged for the "scalars" plugin), so the aggregator needs
no ``tensorboard``; whoever looks at the files installs it (``pip install tensorboard``). Every
scalar is a field of the round's ``RoundRecord``, the same number as in ``metrics.jsonl`` (in
float32, as TensorBoard stores scalars); ``SCALARS`` is the table, and tests read the files back
with TensorBoard's own event reader. A value that is not a number (the devices' training loss
under DP) is left out. A round's events are written after its checkpoint: a run resumed after a
crash between the two lacks that round's point, never holds it twice.

A round's scalars go out as one ``Summary`` of all its values (``write_raw_pb``), one event: a
``tf.summary.write`` per scalar was 25 eager operations, 2.9 ms of the aggregator's time after
every round, while the devices wait for the next (issue 17, docs/benchmarks.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import TracebackType

from fedprune.aggregator.records import RoundRecord

__all__ = ["SCALARS", "TensorBoardLog", "scalars_of"]

#: TensorBoard tag -> RoundRecord field. The prefix before "/" is the group TensorBoard draws it in.
SCALARS: dict[str, str] = {
    "held_out/accuracy": "accuracy",
    "held_out/loss": "loss",
    "devices_training/loss": "train_loss",
    "sparsity/prunable_weights": "sparsity",
    "sparsity/all_weights": "sparsity_all",
    "bytes/up": "bytes_up",
    "bytes/down": "bytes_down",
    "devices/selected": "selected",
    "devices/reported": "reported",
    "devices/rejected": "rejected",
    "devices/offline": "offline",
    "devices/lost": "lost",
    "devices/redelivered": "redelivered",
    "round/attempts": "attempts",
    "privacy/epsilon": "epsilon",
    "time/wall_s": "wall_s",
    "time/fleet_s": "fleet_s",
    "time/train_s": "train_s",
    "time/transfer_s": "transfer_s",
    "time/encode_s": "encode_s",
    "time/decode_s": "decode_s",
    "time/aggregate_s": "aggregate_s",
    "time/evaluate_s": "evaluate_s",
}
LAYER_PREFIX = "sparsity_by_layer/"  # + the weight's name, from RoundRecord.layer_sparsity


def scalars_of(record: RoundRecord) -> dict[str, float]:
    """Tag -> value of one round, as written (values that are None or not a number left out)."""
    out = {tag: getattr(record, field) for tag, field in SCALARS.items()}
    out.update({LAYER_PREFIX + name: value for name, value in record.layer_sparsity.items()})
    return {tag: float(v) for tag, v in out.items() if v is not None and not math.isnan(float(v))}


class TensorBoardLog:
    """``with TensorBoardLog(run_dir) as tb: tb.write(record)`` for each completed round."""

    def __init__(self, run_dir: Path) -> None:
        from tensorflow.core.framework import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        from fedprune.keras_setup import tf

        self._tf, self._summary_pb2 = tf, summary_pb2
        self._writer = tf.summary.create_file_writer(str(run_dir))
        # What tensorboard.plugins.scalar.metadata.create_summary_metadata makes (ScalarPluginData
        # version 0 serializes to no bytes).
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars", content=b""),
            data_class=summary_pb2.DATA_CLASS_SCALAR)
        # A scalar as tf.summary.write stores it: a rank-0 float32 tensor.
        self._scalar = lambda value: tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(), float_val=[value])

    def write(self, record: RoundRecord) -> None:
        summary = self._summary_pb2.Summary(value=[
            self._summary_pb2.Summary.Value(tag=tag, tensor=self._scalar(value), metadata=self._metadata)
            for tag, value in scalars_of(record).items()])
        with self._writer.as_default():
            self._tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=record.round)
        self._writer.flush()  # a run watched live shows each round as it completes

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
