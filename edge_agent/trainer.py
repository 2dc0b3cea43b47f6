"""Local training with Keras under tfmot pruning wrappers.

Each masked kernel is wrapped in tfmot's ``PruneLowMagnitude``, and the wrapper's mask variable
starts as the task's mask. Two modes, set per task:

- aggregator-owned mask (default): the schedule never prunes, so every training step multiplies
  the kernel by the aggregator's mask: pruned weights stay exactly zero in the forward pass, and
  the result is masked once more before it leaves (as ``strip_pruning`` does);
- device-side pruning (``task.device_sparsity`` set): tfmot prunes by magnitude to that sparsity
  at every step, as in the original method's code, and the device sends its own mask back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fedprune.architecture import model_from_architecture_json
from fedprune.converters.protocol import Architecture, TrainTask
from fedprune.edge_agent.batchnorm_stats import recalibrate_batchnorm
from fedprune.edge_agent.device import TrainResult
from fedprune.edge_agent.training_checks import TrainingError, check_local_data
from fedprune.keras_setup import keras, tf
from fedprune.models import PRUNABLE_KERNELS, get_layer_weights, kernel_positions, weight_variables
from fedprune.pruning.masks import apply_masks
from fedprune.pruning.regrowth import GRADIENT_SAMPLES, report_pruned_gradients

import tensorflow_model_optimization as tfmot  # noqa: E402  (after keras_setup, on purpose)
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (  # noqa: E402
    PruneLowMagnitude,
)

log = logging.getLogger(__name__)


class TaskSchedule(tfmot.sparsity.keras.PruningSchedule):
    """A tfmot schedule driven by variables, set anew for each task without retracing.

    ``prune`` False: the mask is imposed (it comes from the aggregator); True: tfmot prunes to
    ``target`` by magnitude at every training step.
    """

    def __init__(self) -> None:
        self.prune = tf.Variable(False, trainable=False)
        self.target = tf.Variable(0.0, trainable=False, dtype=tf.float32)

    # Plain TF ops: nothing for autograph to convert. Converting means re-reading this file from
    # disk, so a file replaced under a running process (an in-place upgrade) made it convert the
    # wrong method ("tf____init__() takes 1 positional argument but 2 were given").
    @tf.autograph.experimental.do_not_convert
    def __call__(self, step):  # noqa: D102 - tfmot interface
        return tf.identity(self.prune), tf.identity(self.target)

    def get_config(self):  # noqa: D102
        return {"class_name": type(self).__name__, "config": {}}


@dataclass
class _Compiled:
    model: keras.Model
    # weight index of each prunable kernel -> its (kernel, mask) variables in its layer's wrapper
    kernels: dict[int, tuple[tf.Variable, tf.Variable]]
    schedules: dict[int, TaskSchedule]  # weight index of each prunable kernel -> its wrapper's schedule
    optimizer_name: str = ""
    epoch: Callable[..., tuple] | None = None  # the traced local epoch (``_epoch_function``), once needed
    probes: dict = field(default_factory=dict)  # BatchNormalization layer -> the sub-model giving its input
    random_layers: bool = False  # whether the training step draws from TensorFlow's generators
    load: Callable[..., None] | None = None  # the traced task loader (``_task_loader``), once needed
    load_slots: int = 0  # the optimizer variables the loader zeroes
    flat_weights: "_FlatTensorCache" = field(default_factory=lambda: _FlatTensorCache())
    flat_masks: "_FlatTensorCache" = field(default_factory=lambda: _FlatTensorCache())
    # The weight tensors' shapes, in ``weight_variables`` order: fixed for the model's life.
    shapes: list[tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.shapes = [tuple(v.shape) for v in weight_variables(self.model)]


#: Layers whose training step draws from TensorFlow's random generators (by class-name prefix).
_RANDOM_LAYERS = ("Dropout", "SpatialDropout", "AlphaDropout", "GaussianDropout", "GaussianNoise", "Random")


def _seed_task(compiled: _Compiled, seed: int) -> None:
    """Seed a task's randomness: Python's and NumPy's generators (the batch order) always, and
    TensorFlow's global seed only for a model whose training step draws random numbers.

    ``tf.random.set_seed`` also clears TensorFlow's kernel cache, so the traced training step is
    instantiated again at its next call: 0.1 s per call, 0.19 s instead of 0.016 s for a digits CNN
    task on a shared trainer (measured for issue 17), which made a simulated round's "training"
    mostly TensorFlow set-up. A model without random layers trains the same either way.
    """
    import random

    random.seed(seed)
    np.random.seed(seed)
    if compiled.random_layers:
        keras.utils.set_random_seed(seed)


def _use_optimizer(compiled: _Compiled, name: str, learning_rate: float) -> bool:
    """Compile with optimizer ``name`` unless the model already has it; True if it compiled (fresh
    state: nothing to reset).

    Recompiling drops the traced train function, and retracing it costs more than a small
    device's whole local epoch; zeroing the slots (``_task_loader``) keeps the trace.
    """
    if compiled.optimizer_name == name:
        return False
    compiled.model.compile(
        optimizer=_optimizer(name, learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    compiled.optimizer_name = name
    compiled.epoch = compiled.load = None  # traced against the old optimizer
    return True


def _load_task(compiled: _Compiled, task: TrainTask) -> None:
    """Load ``task`` into the wrapped model (``_task_loader``), compiling first if the task names
    another optimizer. ValueError if the task's weights do not fit the model."""
    model = compiled.model
    shapes = compiled.shapes
    given = [tuple(np.shape(w)) for w in task.weights]
    if given != shapes:
        raise ValueError(f"the task's weights have shapes {given}; the model's are {shapes}")
    settings = task.training
    fresh = _use_optimizer(compiled, settings.optimizer, float(settings.learning_rate))
    # The optimizer makes its slots at its first step: a loader traced before zeroes too few.
    if compiled.load is None or compiled.load_slots != len(model.optimizer.variables):
        compiled.load, compiled.load_slots = _task_loader(compiled), len(model.optimizer.variables)
    ids = sorted(compiled.kernels)
    device_pruning = task.device_sparsity is not None
    prune = np.array([device_pruning and task.masks[i] is not None for i in ids], bool)
    target = np.full(len(ids), float(task.device_sparsity or 0.0), np.float32)
    weights = compiled.flat_weights.get(task.weights, lambda: np.concatenate(
        [np.asarray(w, np.float32).ravel() for w in task.weights]))
    masks = compiled.flat_masks.get([task.masks[i] for i in ids], lambda: np.concatenate(
        [np.ones(int(np.prod(shapes[i])), np.float32) if task.masks[i] is None
         else task.masks[i].astype(np.float32).ravel() for i in ids]))
    compiled.load(weights, masks, prune, target, np.float32(settings.learning_rate), not fresh)


class _FlatTensorCache:
    """The last list of arrays given and its flat tensor: a simulated device process trains the
    same task (the same decoded arrays, ``SharedTasks``) for each of its devices a round, and
    concatenating and converting 0.6 MB twice per device cost a tenth of a digits task's CPU.
    A hit needs the very same array objects (or Nones), all read-only (as ``SharedTasks`` leaves
    them): an array that can be written to may have changed since, and is flattened again."""

    def __init__(self) -> None:
        self._arrays: list = []
        self._tensor = None

    def get(self, arrays: list, flatten: Callable[[], np.ndarray]):
        if self._tensor is None or len(arrays) != len(self._arrays) or \
                any(a is not b or not _read_only(a) for a, b in zip(arrays, self._arrays)):
            self._tensor = tf.convert_to_tensor(flatten())  # Flat: one argument to convert, not one per tensor
            self._arrays = list(arrays)
        return self._tensor


def _read_only(a) -> bool:
    """None, or an array nobody can write to."""
    return a is None or (isinstance(a, np.ndarray) and not a.flags.writeable)


def _task_loader(compiled: _Compiled) -> Callable[..., None]:
    """One traced call that loads a task into the wrapped model: the global weights, each masked
    kernel's mask (ones where the task has none) and the kernel masked by it, each schedule's mode,
    and fresh optimizer state (every slot zeroed, the task's learning rate; the optimizer's slots
    exist once the step has been traced).

    The same assignments as one eager call per variable, without the Python dispatch of some forty
    small eager ops: 4 ms of CPU per digits CNN task as eager calls, 1.8 ms as one (issue 17), on
    every device and every round.
    """
    model = compiled.model
    weight_vars = weight_variables(model)
    kernel_ids = sorted(compiled.kernels)
    optimizer_vars = list(model.optimizer.variables)

    def unflatten(flat, variables):
        sizes = [int(np.prod(v.shape)) for v in variables]
        return [tf.reshape(part, v.shape) for part, v in zip(tf.split(flat, sizes), variables)]

    @tf.function(autograph=False)
    def load(flat_weights, flat_masks, prune, target, learning_rate, reset_optimizer):
        """``flat_weights``: every weight tensor's values in order, concatenated; ``flat_masks``:
        each masked kernel's mask (ones where the task has none), in weight order."""
        weights = unflatten(flat_weights, weight_vars)
        masks = unflatten(flat_masks, [compiled.kernels[idx][0] for idx in kernel_ids])
        for var, w in zip(weight_vars, weights):
            var.assign(w)
        for k, (idx, mask) in enumerate(zip(kernel_ids, masks)):
            kernel, mask_var = compiled.kernels[idx]
            mask_var.assign(mask)
            kernel.assign(weights[idx] * mask)
            schedule = compiled.schedules[idx]  # a separable layer's two kernels share it: same values
            schedule.prune.assign(prune[k])
            schedule.target.assign(target[k])
        if reset_optimizer:
            for v in optimizer_vars:
                v.assign(tf.zeros_like(v))
        model.optimizer.learning_rate.assign(learning_rate)

    return load


class KerasTrainer:
    """Trains task after task; caches one wrapped model per architecture.

    Every layer with prunable kernels (``fedprune.models.PRUNABLE_KERNELS``) is wrapped, masked or
    not (an unmasked kernel trains under a mask of ones), so one traced training step serves every
    task of an architecture, and ``prepare`` can trace it before the first task arrives.

    Thread-safe: one trainer can serve many simulated devices in one process, one at a time.

    After training, BatchNormalization layers get the exact moving statistics of the trained
    weights on the local data (``batchnorm_stats``); ``recalibrate_batchnorm = False`` leaves them
    as Keras's momentum left them (benchmarks switch it off to measure what it buys).
    """

    recalibrate_batchnorm: bool = True

    def __init__(self) -> None:
        self._cache: dict[str, _Compiled] = {}
        self._lock = threading.Lock()

    def prepare(self, architecture: Architecture) -> None:
        """Build, compile and trace the training step for ``architecture`` now, so that the first
        task trains at the steady speed.

        Tracing costs a small device seconds (more than a round of local training); a device
        calls this when the architecture is announced, long before it is selected.
        """
        with self._lock:
            if architecture.digest in self._cache:
                return
            start = time.perf_counter()
            compiled = self._compiled(architecture)
            _use_optimizer(compiled, "adam", 0.001)  # the default optimizer: tasks reuse the trace
            # One step on a dummy batch traces it (the batch dimension is left open: one trace
            # serves every batch size) and creates the optimizer's slots.
            shape = (2, *compiled.model.input_shape[1:])
            _fit(compiled, np.zeros(shape, np.float32), np.zeros(2, np.int64), epochs=1, batch_size=2)
            log.info("prepared the training step for architecture %s in %.1f s",
                     architecture.digest[:8], time.perf_counter() - start)

    def train(self, architecture: Architecture, task: TrainTask, x: np.ndarray, y: np.ndarray,
              seed: int | None = None) -> TrainResult:
        """Train on ``(x, y)`` from the task's global weights. ``seed``: draw this task's batches
        (and reseed TensorFlow's and NumPy's global generators) from it, so that a task trains the
        same whichever device trained on this trainer before (a shared trainer in a simulation)."""
        with self._lock:
            start = time.perf_counter()
            compiled = self._compiled(architecture)
            if seed is not None:
                _seed_task(compiled, seed)
            check_local_data(x, y, compiled.model.input_shape[1:], compiled.model.output_shape[-1])
            unknown = [i for i, m in enumerate(task.masks) if m is not None and i not in compiled.kernels]
            if unknown:
                raise TrainingError(f"the mask covers weight tensors {unknown} that are not prunable kernels")
            _load_task(compiled, task)
            settings = task.training
            logs, last_epoch_s, trained = _fit(compiled, x, y, epochs=settings.local_epochs,
                                               batch_size=settings.batch_size)
            if self.recalibrate_batchnorm and recalibrate_batchnorm(
                    compiled.model, np.asarray(x, np.float32), compiled.probes):
                trained = None  # the moving statistics changed since the last epoch read the weights
            masks = list(task.masks)
            if task.device_sparsity is not None:
                for idx, (_, mask_var) in compiled.kernels.items():
                    if masks[idx] is not None:
                        masks[idx] = mask_var.numpy().astype(bool)
            new = apply_masks(get_layer_weights(compiled.model) if trained is None else trained, masks)
            delta = [np.subtract(n, w, dtype=np.float32) for n, w in zip(new, task.weights)]
            metrics = {
                "loss": logs["loss"],
                "accuracy": logs["accuracy"],
                "train_s": time.perf_counter() - start,  # with wrapping, compiling and tracing
                "last_epoch_s": last_epoch_s,  # one local epoch once traced: the steady cost
            }
            result = TrainResult(delta, masks, metrics)
            if task.gradient_fraction:
                result.gradients, result.gradient_masks = _pruned_gradients(
                    compiled, task, masks, x, y, task.gradient_fraction)
            return result

    def _compiled(self, architecture: Architecture) -> _Compiled:
        if architecture.digest not in self._cache:
            self._cache[architecture.digest] = _wrap(architecture)
        return self._cache[architecture.digest]


def _fit(compiled: _Compiled, x: np.ndarray, y: np.ndarray, epochs: int,
         batch_size: int) -> tuple[dict, float, list[np.ndarray] | None]:
    """``epochs`` shuffled passes over ``(x, y)``, each one traced call that runs the model's
    training step batch by batch; returns the last epoch's mean loss and accuracy, its seconds, and
    the weights after it (as ``get_layer_weights`` lists them; None for a model whose weights are
    not all float32, which ``get_layer_weights`` then reads).

    What ``model.fit`` does for in-memory data, without its per-call set-up (a tf.data pipeline,
    its traced map functions, callbacks): on a shard of a few dozen samples that set-up cost more
    than the training itself. The pruning wrappers need nothing more: each one counts its steps
    and applies its mask inside the step, and the result is masked once more before it leaves.
    """
    model = compiled.model
    if compiled.epoch is None:
        compiled.epoch = _epoch_function(model)
    x = tf.convert_to_tensor(np.asarray(x, np.float32))
    y = tf.convert_to_tensor(np.asarray(y, np.int64))
    logs: dict = {}
    flat = None
    last_epoch_s = 0.0
    try:
        for _ in range(epochs):
            start = time.perf_counter()
            order = np.random.permutation(int(x.shape[0]))  # seeded by keras.utils.set_random_seed
            logs, flat = compiled.epoch(x, y, order, np.int64(batch_size))  # the logs: this epoch's means
            last_epoch_s = time.perf_counter() - start
    except BaseException:
        model.reset_metrics()  # an epoch cut short leaves its counts behind; the next task's must not see them
        raise
    if flat is None or flat.shape[0] == 0:
        return {k: float(v) for k, v in logs.items()}, last_epoch_s, None
    values = flat.numpy()
    ends = np.cumsum([int(np.prod(s)) for s in compiled.shapes])[:-1]
    weights = [part.reshape(s) for part, s in zip(np.split(values, ends), compiled.shapes)]
    return {k: float(v) for k, v in logs.items()}, last_epoch_s, weights


def _epoch_function(model: keras.Model):
    """One local epoch in one traced call: the model's own ``train_step`` (forward, loss, optimizer
    step, metrics) on the batches ``order`` cuts, in order, for any number of samples and any
    batch size. Returns the metrics' results after the last batch, then resets them for the next
    epoch, and the model's weights, flat, in ``weight_variables`` order (empty where not all of
    them are float32).

    One call per epoch instead of one per batch: each call of a traced function costs Python time
    of its own (binding and converting its arguments, about 0.4 ms), 16 % of a digits CNN task's
    CPU when paid per batch (issue 17). The step is the same graph either way, as Keras's
    ``steps_per_execution`` runs it: the deltas and logs are bit-identical (checked). For the same
    reason the metrics' reset and reading the weights back are in this call too, not calls of their
    own (``Layer.get_weights`` is one eager read per variable): 1.9 ms less CPU per digits task."""
    x_spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
    y_spec = tf.TensorSpec((None,), tf.int64)
    index_spec = tf.TensorSpec((None,), tf.int64)
    weight_vars = weight_variables(model)
    flat_weights = all(v.dtype == tf.float32 for v in weight_vars)

    @tf.function(input_signature=[x_spec, y_spec, index_spec, tf.TensorSpec((), tf.int64)])
    def epoch(x, y, order, batch_size):
        n = tf.size(order, out_type=tf.int64)
        for first in tf.range(tf.constant(0, tf.int64), n, batch_size):
            batch = order[first:first + batch_size]
            model.train_step((tf.gather(x, batch), tf.gather(y, batch)))
        # Read, then reset (in this order: the calls' automatic control dependencies keep it). The
        # metrics exist by now, built by the first step of the first trace.
        results = {k: tf.identity(v) for k, v in model.get_metrics_result().items()}
        model.reset_metrics()
        weights = tf.concat([tf.reshape(v, [-1]) for v in weight_vars], 0) if flat_weights \
            else tf.zeros([0], tf.float32)
        return results, weights

    return epoch


def _name_prunable_kernels(layer) -> None:
    """Tell tfmot which of ``layer``'s weights to prune: all its kernels in ``PRUNABLE_KERNELS``.

    tfmot's registry lists no weight of DepthwiseConv2D and only the pointwise kernel of a
    separable convolution, so those kernels were wrapped yet never pruned; a layer that has its
    own ``get_prunable_weights`` is pruned by what it names (tfmot's ``PrunableLayer`` protocol).
    """
    names = PRUNABLE_KERNELS[type(layer).__name__]
    layer.get_prunable_weights = lambda: [getattr(layer, name) for name in names]


def _wrap(architecture: Architecture) -> _Compiled:
    """The architecture with every layer that has prunable kernels in a ``PruneLowMagnitude``
    wrapper, each with a schedule of its own (device-side pruning prunes only the layers the task
    masks)."""
    plain = model_from_architecture_json(architecture.model_json)
    candidates = [l.name for l in plain.layers if type(l).__name__ in PRUNABLE_KERNELS]
    layer_of = kernel_positions(plain, candidates)  # weight index -> layer name
    schedules = {name: TaskSchedule() for name in candidates}

    def wrap(layer):
        if layer.name in schedules:
            _name_prunable_kernels(layer)
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedules[layer.name])
        return layer

    model = keras.models.clone_model(plain, clone_function=wrap)
    wrappers = {layer.layer.name: layer for layer in model.layers if isinstance(layer, PruneLowMagnitude)}
    kernels: dict[int, tuple[tf.Variable, tf.Variable]] = {}
    for name, wrapper in wrappers.items():
        indices = [idx for idx, layer_name in sorted(layer_of.items()) if layer_name == name]
        for idx, (kernel, mask, _) in zip(indices, wrapper.pruning_vars, strict=True):  # both in weight order
            kernels[idx] = (kernel, mask)
        wrapper.pruning_step.assign(0)  # what UpdatePruningStep does before the first fit
    return _Compiled(model=model, kernels=kernels,
                     schedules={idx: schedules[name] for idx, name in layer_of.items()},
                     random_layers=any(type(layer).__name__.startswith(_RANDOM_LAYERS) for layer in model.submodules))


def _pruned_gradients(compiled: _Compiled, task: TrainTask, masks, x, y, fraction: float):
    """The loss gradient (inference mode, the first 512 samples) at the pruned positions with the
    largest magnitude, for regrowth (``report_pruned_gradients``)."""
    n = min(len(x), GRADIENT_SAMPLES)
    kernels = {idx: kernel for idx, (kernel, _) in compiled.kernels.items()}
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y[:n], compiled.model(x[:n], training=False))
    grads = dict(zip(kernels, tape.gradient(loss, list(kernels.values()))))
    gradients = [grads[i].numpy() if i in grads else None for i in range(len(task.weights))]
    return report_pruned_gradients([w.shape for w in task.weights], gradients, masks, fraction)


def _optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    raise TrainingError(f"unknown optimizer {name!r}; use 'sgd' or 'adam'")
