"""Local training without TensorFlow: a trainable TFLite file run by a TFLite runtime.

The aggregator builds the file from the task's Keras model
(:func:`fedprune.converters.trainable_tflite.build_trainable_tflite`); :class:`LiteRTTrainer` runs
its signatures in whichever runtime :func:`~fedprune.converters.tflite_export.load_interpreter`
finds (LiteRT, then tflite-runtime), with NumPy for the rest: tens of MB instead of the 600-800 MB
of a TensorFlow process.

A round does what the Keras trainer's does: ``local_epochs`` shuffled passes in batches of
``batch_size`` (the last batch of a pass smaller, padded in the file's fixed batch with rows that
count for nothing), one SGD or Adam step per batch at the task's learning rate, from fresh
optimizer state; the aggregator's mask held (pruned weights exactly 0 after every step); the
delta, the last pass's mean loss and accuracy, and the regrowth gradients when the task asks.
After training, every BatchNormalization layer's moving mean and variance are set to the exact mean
and biased variance of its input over the local data, the trained weights in inference mode, layer
after layer, as the Keras trainer sets them (``batchnorm_stats``; docs/pruning.md): the file's
``batchnorm_moments`` measures each batch, and the batches are merged here in float64. Not done
here: device-side pruning (``task.device_sparsity``), refused with a TrainingError.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from fedprune.converters import trainable_tflite as file_format
from fedprune.converters.protocol import Architecture, TrainingSettings, TrainTask
from fedprune.converters.tflite_export import RUNTIMES, load_interpreter
from fedprune.edge_agent.device import TrainResult
from fedprune.edge_agent.trainable_files import TrainableFiles
from fedprune.edge_agent.training_checks import TrainingError, check_local_data
from fedprune.pruning.regrowth import GRADIENT_SAMPLES, report_pruned_gradients

log = logging.getLogger(__name__)


class LiteRTTrainer:
    """A ``Trainer`` over one trainable TFLite file (one architecture, one batch size).

    Thread-safe: one trainer can serve many simulated devices, one at a time.

    ``recalibrate_batchnorm = False`` leaves BatchNormalization's moving statistics as the layers'
    momentum left them in training (benchmarks switch it off to measure what it buys).
    """

    recalibrate_batchnorm: bool = True

    def __init__(self, trainable_tflite: bytes, seed: int | None = None, num_threads: int | None = None,
                 runtimes: tuple[str, ...] = RUNTIMES) -> None:
        """Load the file in the first available runtime of ``runtimes``; ``seed`` seeds the
        shuffling and the dropout noise; ``num_threads`` defaults to every core, as TensorFlow
        trains (the runtime's own default ran the digits CNN's round 2.4x slower on two cores)."""
        loaded = load_interpreter(trainable_tflite, num_threads or os.cpu_count(), runtimes)
        self.runtime = loaded.label
        self._interpreter = loaded.interpreter
        self._lock = threading.Lock()
        self.rng = np.random.default_rng(seed)
        self._warned_stale = False
        names = (*file_format.TRAIN.values(), file_format.INFER, file_format.GRADIENTS, file_format.GET_WEIGHTS,
                 file_format.SET_WEIGHTS)
        signatures = self._interpreter.get_signature_list()
        missing = [name for name in names if name not in signatures]
        if missing:
            raise ValueError(f"not a trainable TFLite file: it has no signature {missing} (signatures: "
                             f"{sorted(signatures)}); build it with build_trainable_tflite")
        self._run = {name: self._interpreter.get_signature_runner(name) for name in names}
        # (moving mean index, moving variance index) of each BatchNormalization layer, in order;
        # a file without the signature has none (or was built before it existed: _recalibrate_batchnorm)
        self._batchnorm: list[tuple[int, int]] = []
        if file_format.BATCHNORM_MOMENTS in signatures:
            self._run[file_format.BATCHNORM_MOMENTS] = self._interpreter.get_signature_runner(
                file_format.BATCHNORM_MOMENTS)
            self._batchnorm = file_format.batchnorm_statistics(
                list(self._run[file_format.BATCHNORM_MOMENTS].get_output_details()))
        train_inputs = self._run[file_format.TRAIN["sgd"]].get_input_details()
        x_shape = [int(d) for d in train_inputs[file_format.INPUT_X]["shape"]]
        self.batch_size, self.sample_shape = x_shape[0], tuple(x_shape[1:])
        self.classes = int(train_inputs[file_format.INPUT_LABELS]["shape"][-1])
        self._dropout_shapes = {name: tuple(int(d) for d in detail["shape"])
                                for name, detail in train_inputs.items() if name.startswith(file_format.DROPOUT_PREFIX)}
        weight_outputs = self._run[file_format.GET_WEIGHTS].get_output_details()
        self.shapes = [tuple(int(d) for d in weight_outputs[file_format.weight_name(i)]["shape"])
                       for i in range(len(weight_outputs))]
        set_inputs = self._run[file_format.SET_WEIGHTS].get_input_details()
        self.maskable = [file_format.mask_name(i) in set_inputs for i in range(len(self.shapes))]
        log.info("trainable TFLite file loaded in %s: %d weight tensors (%d maskable), batch %d",
                 self.runtime, len(self.shapes), sum(self.maskable), self.batch_size)

    def train(self, architecture: Architecture, task: TrainTask, x: np.ndarray, y: np.ndarray,
              seed: int | None = None) -> TrainResult:
        """Train on ``(x, y)`` from the task's global weights; ``seed``: draw this task's batches
        and dropout noise from it instead of the trainer's own generator (the same task trains the
        same whichever tasks this trainer trained before)."""
        with self._lock:
            rng = self.rng if seed is None else np.random.default_rng(seed)
            start = time.perf_counter()
            settings = self._check(architecture, task, x, y)
            self._set_weights(task.weights, task.masks)
            x = np.asarray(x, np.float32)
            onehot = np.eye(self.classes, dtype=np.float32)[np.asarray(y, np.int64)]
            train = self._run[file_format.TRAIN[settings.optimizer]]
            learning_rate = file_format.learning_rate_input(settings.learning_rate)
            loss = correct = 0.0
            last_epoch_s = 0.0
            for _ in range(settings.local_epochs):
                epoch_start = time.perf_counter()
                loss = correct = 0.0  # the metrics are the last pass's, as Keras reports them
                order = rng.permutation(len(x))
                for first in range(0, len(x), self.batch_size):
                    rows = order[first:first + self.batch_size]
                    out = train(**self._batch(x, onehot, rows), lr=learning_rate, **self._dropout_noise(rng))
                    loss += float(out[file_format.OUTPUT_LOSS]) * len(rows)
                    correct += float(out[file_format.OUTPUT_CORRECT])
                last_epoch_s = time.perf_counter() - epoch_start
            trained = self._get_weights()
            if self.recalibrate_batchnorm:
                trained = self._recalibrate_batchnorm(architecture, x, trained, task.masks)
            delta = [t - w.astype(np.float32) for t, w in zip(trained, task.weights)]
            metrics = {"loss": loss / max(len(x), 1), "accuracy": correct / max(len(x), 1),
                       "train_s": time.perf_counter() - start, "last_epoch_s": last_epoch_s}
            result = TrainResult(delta, list(task.masks), metrics)
            if task.gradient_fraction:
                gradients = self._mean_gradients(x[:GRADIENT_SAMPLES], onehot[:GRADIENT_SAMPLES])
                result.gradients, result.gradient_masks = report_pruned_gradients(
                    self.shapes, gradients, task.masks, task.gradient_fraction)
            return result

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits of the weights last set or trained (inference mode)."""
        with self._lock:
            return self._run[file_format.INFER](**{file_format.INPUT_X: np.asarray(x, np.float32)})[
                file_format.OUTPUT_LOGITS]

    def _check(self, architecture: Architecture, task: TrainTask, x: np.ndarray, y: np.ndarray) -> TrainingSettings:
        settings = task.training
        if settings.optimizer not in file_format.TRAIN:
            raise TrainingError(f"unknown optimizer {settings.optimizer!r}; use one of {sorted(file_format.TRAIN)}")
        if settings.batch_size != self.batch_size:
            raise TrainingError(f"the task trains in batches of {settings.batch_size}, the trainable file was built "
                                f"for {self.batch_size}: build it with the task's batch size")
        if [tuple(s) for s in architecture.shapes] != self.shapes:
            raise TrainingError("the trainable file's weight shapes are not the architecture's: it was built "
                                f"for another model ({len(self.shapes)} tensors vs {len(architecture.shapes)})")
        unmaskable = [i for i, m in enumerate(task.masks) if m is not None and not self.maskable[i]]
        if unmaskable:
            raise TrainingError(f"the task masks weight tensors {unmaskable}, which the trainable file was built "
                                "without masks for")
        if task.device_sparsity is not None:
            raise TrainingError("device-side pruning (task.device_sparsity) needs the Keras trainer; the TFLite "
                                "trainer holds the aggregator's mask only")
        check_local_data(x, y, self.sample_shape, self.classes)
        return settings

    def _set_weights(self, weights: list[np.ndarray], masks: list) -> None:
        """These weights and masks (ones where a maskable tensor has none); resets the optimizer
        state."""
        tensors = {file_format.weight_name(i): np.asarray(w, np.float32) for i, w in enumerate(weights)}
        for i, (shape, mask) in enumerate(zip(self.shapes, masks)):
            if self.maskable[i]:
                tensors[file_format.mask_name(i)] = (np.ones(shape, np.float32) if mask is None
                                                     else mask.astype(np.float32))
        self._run[file_format.SET_WEIGHTS](**tensors)

    def _get_weights(self) -> list[np.ndarray]:
        out = self._run[file_format.GET_WEIGHTS]()
        return [np.asarray(out[file_format.weight_name(i)], np.float32) for i in range(len(self.shapes))]

    def _batch(self, x: np.ndarray, onehot: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        """One batch in the file's fixed size: a short batch is padded with zero samples whose
        labels are all zero, which the file counts as absent (loss, accuracy, BN statistics)."""
        return {file_format.INPUT_X: self._padded(x[rows]), file_format.INPUT_LABELS: self._padded(onehot[rows])}

    def _padded(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` with rows of zeros up to the file's batch size."""
        missing = self.batch_size - len(batch)
        if not missing:
            return batch
        return np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), np.float32)])

    def _recalibrate_batchnorm(self, architecture: Architecture, x: np.ndarray, weights: list[np.ndarray],
                               masks: list) -> list[np.ndarray]:
        """``weights`` with each BatchNormalization layer's moving mean and variance set to the
        mean and biased variance of its input over ``x`` (inference mode), layer after layer: each
        layer is measured with the earlier layers' new statistics set in the file. The file is left
        holding the returned weights (the regrowth gradients and ``predict`` use them)."""
        if not self._batchnorm:
            if not self._warned_stale and any(n.endswith("moving_mean") for n in architecture.names):
                self._warned_stale = True
                log.warning("the trainable file has no %s signature (built before it existed): BatchNormalization's "
                            "moving statistics are left as the momentum left them", file_format.BATCHNORM_MOMENTS)
            return weights
        weights = list(weights)
        for mean_index, variance_index in self._batchnorm:
            weights[mean_index], weights[variance_index] = self._moments(x, mean_index, variance_index)
            self._set_weights(weights, masks)
        return weights

    def _moments(self, x: np.ndarray, mean_index: int, variance_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and biased variance of one BatchNormalization layer's input over ``x``: the file's
        per-batch means and variances, merged in float64 by the law of total variance (each batch
        weighs its real rows; a padding row counts nowhere)."""
        measure = self._run[file_format.BATCHNORM_MOMENTS]
        mean_name = file_format.moment_mean_name(mean_index)
        variance_name = file_format.moment_variance_name(variance_index)
        means, variances, counts = [], [], []
        for first in range(0, len(x), self.batch_size):
            batch = x[first:first + self.batch_size]
            rows = self._padded(np.ones(len(batch), np.float32))
            out = measure(**{file_format.INPUT_X: self._padded(batch), file_format.INPUT_ROWS: rows})
            means.append(np.asarray(out[mean_name], np.float64))
            variances.append(np.asarray(out[variance_name], np.float64))
            counts.append(len(batch))
        share = np.asarray(counts, np.float64) / sum(counts)
        batch_means = np.stack(means)
        mean = share @ batch_means
        variance = share @ np.stack(variances) + share @ (batch_means - mean) ** 2
        return mean.astype(np.float32), variance.astype(np.float32)

    def _dropout_noise(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {name: rng.random(shape, dtype=np.float32) for name, shape in self._dropout_shapes.items()}

    def _mean_gradients(self, x: np.ndarray, onehot: np.ndarray) -> list[np.ndarray]:
        """The mean loss's gradient over ``x``, in inference mode: the file's per-batch sums added
        up, divided by the sample count."""
        gradients = self._run[file_format.GRADIENTS]
        total = [np.zeros(s, np.float64) for s in self.shapes]
        for first in range(0, len(x), self.batch_size):
            out = gradients(**self._batch(x, onehot, np.arange(first, min(first + self.batch_size, len(x)))))
            for i, t in enumerate(total):
                t += out[file_format.gradient_name(i)]
        return [(t / max(len(x), 1)).astype(np.float32) for t in total]


class TrainableFileTrainer:
    """A ``Trainer`` for a device without TensorFlow: each task is trained with its architecture's
    trainable TFLite file, as the aggregator published it and the device's session received it
    into ``files`` (:class:`~fedprune.edge_agent.trainable_files.TrainableFiles`).

    The file last used stays loaded (a new one replaces it), so rounds after the first pay no
    load. Thread-safe, like :class:`LiteRTTrainer`: simulated devices may share one.
    """

    def __init__(self, files: TrainableFiles, seed: int | None = None, num_threads: int | None = None,
                 runtimes: tuple[str, ...] = RUNTIMES) -> None:
        self.files = files
        self._seed, self._num_threads, self._runtimes = seed, num_threads, runtimes
        self._loaded: tuple[str, LiteRTTrainer] | None = None  # (the file's sha256, its trainer)
        self._lock = threading.Lock()

    def train(self, architecture: Architecture, task: TrainTask, x: np.ndarray, y: np.ndarray,
              seed: int | None = None) -> TrainResult:
        return self._trainer_for(architecture).train(architecture, task, x, y, seed=seed)

    def _trainer_for(self, architecture: Architecture) -> LiteRTTrainer:
        model = self.files.get(architecture.digest)
        if model is None:
            raise TrainingError(f"no trainable TFLite file for architecture {architecture.digest[:8]} on this device; "
                                "the aggregator publishes one when it can build it (see its log)")
        with self._lock:
            if self._loaded is None or self._loaded[0] != model.sha256:
                self._loaded = (model.sha256, LiteRTTrainer(model.content, seed=self._seed,
                                                            num_threads=self._num_threads, runtimes=self._runtimes))
            return self._loaded[1]
