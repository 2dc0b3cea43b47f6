"""Export pruned Keras models to sparse TFLite files and check them in the device runtime.

A model counts as exported only once the runtime that devices use (LiteRT, ``ai-edge-litert``)
has loaded the exact bytes and run a batch through them: LiteRT 2.3.0 with its default
delegates refuses some sparse models (see :func:`open_interpreter`), and a file that the
converter produced but no runtime can run is worse than no file.

Import cost matters on the devices, so this module imports neither TensorFlow nor Keras at
import time. :func:`open_interpreter`, :func:`predict_tflite` and :func:`sparse_weight_stats`
run without TensorFlow when ``ai-edge-litert`` is installed; only :func:`export_sparse_tflite`
imports TensorFlow, for a model its caller built (with :mod:`fedprune.keras_setup`, which selects
Keras 2 before TensorFlow loads: this package imports nothing else of fedprune's).

What ``Optimize.EXPERIMENTAL_SPARSITY`` writes (verified on tf 2.21 / ai-edge-litert 2.3.0,
see :func:`sparse_weight_stats` for the layout): each constant weight tensor with enough zeros
(a Dense kernel at 85 % zeros is; one at 20 % zeros is not) is stored with ``Tensor.sparsity``
set and only its non-zero values in the buffer, behind a ``DENSIFY`` op that rebuilds the dense
tensor when the interpreter is prepared. The file shrinks; RAM and latency stay those of the
dense model.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fedprune.converters.tflite_size import (
    INT8_GRANULARITIES,
    Int8Granularity,
    choose_int8_granularity,
    compact_flatbuffer,
)

if TYPE_CHECKING:  # pragma: no cover - typing only; never imported at run time here
    from ai_edge_litert.interpreter import Interpreter

    import tf_keras as keras

__all__ = [
    "ExportError",
    "Precision",
    "TFLiteExport",
    "export_sparse_tflite",
    "LoadedInterpreter",
    "RUNTIMES",
    "load_interpreter",
    "open_interpreter",
    "predict_tflite",
    "sparse_weight_stats",
]

logger = logging.getLogger(__name__)

Precision = Literal["float32", "int8"]
_PRECISIONS: tuple[str, ...] = ("float32", "int8")

#: At most this many samples of ``representative_x`` calibrate int8 quantization.
MAX_REPRESENTATIVE_SAMPLES = 200

_RUNTIME_DEFAULT = "default delegates"
_RUNTIME_NO_DELEGATES = "builtin ops, no default delegates"


class ExportError(RuntimeError):
    """The converter failed, or the runtime could not load and run the converted model."""


@dataclass(frozen=True)
class TFLiteExport:
    """Result of :func:`export_sparse_tflite`.

    Attributes:
        path: Where the verified ``.tflite`` file now is.
        precision: ``"float32"`` or ``"int8"``.
        size_bytes: Size of the file in bytes.
        runtime: Which runtime loaded and ran the file, and how, e.g.
            ``"ai-edge-litert 2.3.0 (builtin ops, no default delegates)"``.
        accuracy: Top-1 accuracy of the TFLite model on ``eval_x``/``eval_y``, or ``None`` when
            no evaluation data were given.
        granularity: For int8, ``"per_channel"`` or ``"per_tensor"`` quantization of the
            weights; ``None`` for float32.
    """

    path: Path
    precision: str
    size_bytes: int
    runtime: str
    accuracy: float | None
    granularity: str | None = None


# --------------------------------------------------------------------------------------------
# Runtime side: no TensorFlow unless neither LiteRT nor tflite_runtime is importable.
# --------------------------------------------------------------------------------------------


def _is_delegate_failure(exc: BaseException) -> bool:
    """True for the "failed to delegate ... TfLiteXNNPackDelegate failed to prepare" family."""
    return "delegate" in str(exc).lower()


#: The runtimes :func:`load_interpreter` knows, in its default order of preference.
RUNTIMES: tuple[str, ...] = ("litert", "tflite_runtime", "tensorflow")


@dataclass(frozen=True)
class LoadedInterpreter:
    """An interpreter with its tensors allocated, and what runs it.

    Attributes:
        interpreter: The allocated interpreter.
        runtime: The runtime and its version, e.g. ``"ai-edge-litert 2.3.0"``.
        delegates: ``"default delegates"`` (XNNPACK on CPU) or ``"builtin ops, no default
            delegates"`` (the fallback for the LiteRT sparse int8 failure).
    """

    interpreter: Any
    runtime: str
    delegates: str

    @property
    def label(self) -> str:
        return f"{self.runtime} ({self.delegates})"


def _find_runtime(order: tuple[str, ...] = RUNTIMES) -> tuple[str, Any, Any] | None:
    """The first importable runtime of ``order``: ``(label, Interpreter class, OpResolverType)``.

    TensorFlow is imported only when it is reached: when neither LiteRT nor a working
    ``tflite_runtime`` exists, or when ``order`` asks for it first.
    """
    unknown = [name for name in order if name not in RUNTIMES]
    if unknown:
        raise ValueError(f"unknown TFLite runtime(s) {unknown}; choose from {list(RUNTIMES)}")
    for name in order:
        if name == "litert":
            try:
                from ai_edge_litert import __version__ as litert_version
                from ai_edge_litert.interpreter import Interpreter as LiteRTInterpreter
                from ai_edge_litert.interpreter import OpResolverType as LiteRTResolver
            except ImportError as exc:
                logger.debug("ai-edge-litert not importable: %s", exc)
                continue
            return f"ai-edge-litert {litert_version}", LiteRTInterpreter, LiteRTResolver
        if name == "tflite_runtime":
            try:
                # tflite-runtime 2.14 (the last release) fails beside NumPy 2 with errors other
                # than ImportError (e.g. AttributeError "_ARRAY_API not found").
                from tflite_runtime.interpreter import Interpreter as TFLRInterpreter
                from tflite_runtime.interpreter import OpResolverType as TFLRResolver
            except Exception as exc:  # noqa: BLE001 - see comment above
                logger.debug("tflite_runtime not usable: %s", exc)
                continue
            return "tflite_runtime", TFLRInterpreter, TFLRResolver
        try:
            import tensorflow as tf  # only tf.lite here: which Keras TF selects does not matter
        except ImportError as exc:
            logger.debug("tensorflow not importable: %s", exc)
            continue
        return (
            f"tensorflow {tf.__version__} tf.lite",
            tf.lite.Interpreter,
            tf.lite.experimental.OpResolverType,
        )
    return None


def load_interpreter(
    model: str | Path | bytes,
    num_threads: int | None = None,
    runtimes: tuple[str, ...] = RUNTIMES,
) -> LoadedInterpreter:
    """Load a TFLite model in the first available runtime of ``runtimes``; allocate its tensors.

    Order of attempts, for the first runtime of ``runtimes`` that imports (default: LiteRT
    (``ai_edge_litert``), then ``tflite_runtime``, then ``tf.lite``, the only one that imports
    TensorFlow):

    1. The runtime with its default delegates (XNNPACK on CPU).
    2. The same runtime with ``OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``, only when
       step 1 fails with a delegate error. LiteRT 2.3.0 fails ``allocate_tensors()`` on sparse
       models whose FULLY_CONNECTED weights are int8 ("failed to delegate FULLY_CONNECTED node
       ... TfLiteXNNPackDelegate failed to prepare", tensorflow#60762); without default
       delegates the builtin kernels run them. (A sparse int8 Conv2D model did load with the
       defaults, and so did the sparse int8 MLP in TensorFlow 2.21's own interpreter.)

    Args:
        model: A ``.tflite`` path, or the model's bytes (read once, so a file replaced while
            the interpreter loads cannot mix two models).
        num_threads: Passed to the interpreter when not ``None``.
        runtimes: Which runtimes to try, in order (names from :data:`RUNTIMES`).

    Raises:
        RuntimeError: No runtime of ``runtimes`` is importable, or it could not load the model;
            the message carries the runtime's own message.
        ValueError: The runtime rejected the model (e.g. not a TFLite flatbuffer), or an unknown
            runtime name.
    """
    what = "the model bytes" if isinstance(model, (bytes, bytearray)) else str(model)
    source: dict[str, Any] = (
        {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) else {"model_path": str(model)}
    )
    runtime = _find_runtime(tuple(runtimes))
    if runtime is None:
        raise RuntimeError(
            f"no TFLite runtime of {list(runtimes)} is importable: install ai-edge-litert "
            "(or tflite-runtime, or tensorflow)"
        )
    label, interpreter_cls, resolver = runtime
    kwargs: dict[str, Any] = dict(source)
    if num_threads is not None:
        kwargs["num_threads"] = num_threads

    interpreter = interpreter_cls(**kwargs)
    try:
        interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as exc:
        if not _is_delegate_failure(exc):
            raise
        first_error = str(exc)
        logger.info(
            "%s: default delegates failed on %s (%s); retrying without default delegates",
            label,
            what,
            first_error,
        )
        del interpreter
        interpreter = interpreter_cls(
            experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            **kwargs,
        )
        try:
            interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc2:
            raise RuntimeError(
                f"{label} could not allocate {what}: with default delegates: "
                f"{first_error}; without default delegates: {exc2}"
            ) from exc2
        return LoadedInterpreter(interpreter, label, _RUNTIME_NO_DELEGATES)
    return LoadedInterpreter(interpreter, label, _RUNTIME_DEFAULT)


def open_interpreter(
    path: str | Path, num_threads: int | None = None
) -> tuple[Interpreter, str]:
    """Load a ``.tflite`` file with :func:`load_interpreter` in the default runtime order.

    Returns:
        ``(interpreter, runtime)``: an interpreter whose tensors are allocated, and a string
        naming the runtime and delegate choice, e.g. ``"ai-edge-litert 2.3.0 (default
        delegates)"`` or ``"ai-edge-litert 2.3.0 (builtin ops, no default delegates)"``.
    """
    loaded = load_interpreter(path, num_threads)
    return loaded.interpreter, loaded.label


def _quant_params(detail: dict[str, Any]) -> tuple[float, int] | None:
    """Per-tensor ``(scale, zero_point)`` of an input/output tensor, or None if not quantized."""
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not scale or np.dtype(detail["dtype"]).kind not in "iu":
        return None
    return float(scale), int(zero_point)


def predict_tflite(interpreter: Interpreter, x: np.ndarray) -> np.ndarray:
    """Run ``x`` through an allocated single-input interpreter and return output 0 as float32.

    The batch is fed in chunks of the input tensor's current batch size (1 for models from
    ``TFLiteConverter.from_keras_model``), the way a device runs it; the interpreter is not
    resized. A quantized (int8/uint8) input is quantized with the tensor's scale and zero
    point; a quantized output is dequantized.

    Args:
        interpreter: From :func:`open_interpreter` (tensors allocated).
        x: Samples, shape ``(n, *input_shape[1:])``.

    Returns:
        ``(n, *output_shape[1:])`` float32 array.
    """
    in_detail = interpreter.get_input_details()[0]
    out_detail = interpreter.get_output_details()[0]
    in_shape = tuple(int(d) for d in in_detail["shape"])
    x = np.asarray(x)
    if x.shape[1:] != in_shape[1:]:
        raise ValueError(f"x has sample shape {x.shape[1:]}, the model expects {in_shape[1:]}")
    batch = max(in_shape[0], 1)
    in_dtype = np.dtype(in_detail["dtype"])
    in_q = _quant_params(in_detail)
    if in_q is not None:
        scale, zero_point = in_q
        info = np.iinfo(in_dtype)
        feed = np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(in_dtype)
    else:
        feed = x.astype(in_dtype, copy=False)

    n = feed.shape[0]
    outputs: list[np.ndarray] = []
    for start in range(0, n, batch):
        chunk = feed[start : start + batch]
        rows = chunk.shape[0]
        if rows < batch:  # pad the last chunk of a fixed batch > 1
            pad = np.zeros((batch - rows, *chunk.shape[1:]), dtype=in_dtype)
            chunk = np.concatenate([chunk, pad])
        interpreter.set_tensor(in_detail["index"], chunk)
        interpreter.invoke()
        outputs.append(np.array(interpreter.get_tensor(out_detail["index"])[:rows]))
    out_shape = tuple(int(d) for d in out_detail["shape"][1:])
    if not outputs:
        return np.zeros((0, *out_shape), dtype=np.float32)
    y = np.concatenate(outputs)
    out_q = _quant_params(out_detail)
    if out_q is not None:
        scale, zero_point = out_q
        return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return y.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Flatbuffer inspection
# --------------------------------------------------------------------------------------------

# TensorType enum value -> numpy dtype (types with a whole number of bytes per element).
_TFLITE_DTYPES: dict[int, np.dtype] = {
    0: np.dtype(np.float32),
    1: np.dtype(np.float16),
    2: np.dtype(np.int32),
    3: np.dtype(np.uint8),
    4: np.dtype(np.int64),
    6: np.dtype(np.bool_),
    7: np.dtype(np.int16),
    9: np.dtype(np.int8),
    10: np.dtype(np.float64),
    12: np.dtype(np.uint64),
    15: np.dtype(np.uint32),
    16: np.dtype(np.uint16),
}
_DIM_DENSE = 0  # schema DimensionType.DENSE
_DIM_SPARSE_CSR = 1  # schema DimensionType.SPARSE_CSR


def _read_flatbuffer(path: str | Path) -> Any:
    """``ModelT`` of a ``.tflite`` file (object API), from LiteRT's tools if present, else TF's."""
    try:
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:
        from tensorflow.lite.tools import flatbuffer_utils  # lazy: debug aid only
    return flatbuffer_utils.read_model(str(path))


def _int_list(value: Any) -> list[int]:
    """A schema int vector (list, numpy array or None, depending on the reader) as a list."""
    if value is None:
        return []
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _index_vector(vec: Any) -> np.ndarray:
    """Values of an Int32Vector/Uint16Vector/Uint8Vector union member as an int64 array."""
    if vec is None or vec.values is None:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(vec.values).astype(np.int64)


def _index_bytes(vec: Any) -> int:
    if vec is None or vec.values is None:
        return 0
    values = vec.values
    itemsize = values.dtype.itemsize if isinstance(values, np.ndarray) else 4
    return len(values) * itemsize


def _densify(
    values: np.ndarray, shape: tuple[int, ...], sparsity: Any
) -> tuple[np.ndarray, int]:
    """Rebuild the dense tensor from TFLite ``SparsityParameters`` (TACO-style format).

    Walks the levels in traversal order: a DENSE level of size ``d`` expands every parent
    position ``p`` into ``p * d + i``; a SPARSE_CSR level maps parent ``p`` to the stored
    positions ``array_segments[p] .. array_segments[p + 1] - 1`` with coordinates
    ``array_indices[j]``. The final positions index ``values``. Block dimensions (``block_map``)
    are folded back into the original ones. Unstored elements are 0.

    Returns:
        ``(dense array, number of values addressed)``.
    """
    rank = len(shape)
    block_map = _int_list(sparsity.blockMap)
    levels = list(sparsity.dimMetadata) if sparsity.dimMetadata is not None else []
    order = _int_list(sparsity.traversalOrder) or list(range(rank))
    n_dims = rank + len(block_map)
    if len(order) != n_dims or len(levels) != n_dims:
        raise ValueError(
            f"inconsistent sparsity: rank {rank}, block_map {block_map}, "
            f"traversal_order {order}, {len(levels)} dim_metadata"
        )

    positions = np.zeros(1, dtype=np.int64)
    coords = np.zeros((n_dims, 1), dtype=np.int64)  # indexed by expanded dimension id
    for level, meta in zip(order, levels):
        if meta.format == _DIM_DENSE:
            size = int(meta.denseSize)
            positions = (positions[:, None] * size + np.arange(size)).reshape(-1)
            coords = np.repeat(coords, size, axis=1)
            coords[level] = np.tile(np.arange(size), coords.shape[1] // size if size else 0)
        elif meta.format == _DIM_SPARSE_CSR:
            segments = _index_vector(meta.arraySegments)
            indices = _index_vector(meta.arrayIndices)
            starts = segments[positions]
            counts = segments[positions + 1] - starts
            total = int(counts.sum())
            offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            positions = np.repeat(starts, counts) + offsets
            coords = np.repeat(coords, counts, axis=1)
            coords[level] = indices[positions]
        else:
            raise ValueError(f"unknown DimensionType {meta.format}")

    dense_coords = []
    for dim in range(rank):
        if dim in block_map:
            block_dim = rank + block_map.index(dim)
            block_size = int(levels[order.index(block_dim)].denseSize)
            dense_coords.append(coords[dim] * block_size + coords[block_dim])
        else:
            dense_coords.append(coords[dim])
    dense = np.zeros(shape, dtype=values.dtype)
    if positions.size:
        if int(positions.max()) >= values.size:
            raise ValueError(
                f"sparsity addresses value {int(positions.max())}, buffer holds {values.size}"
            )
        dense[tuple(dense_coords)] = values[positions]
    return dense, int(positions.size)


def sparse_weight_stats(
    path: str | Path, min_elements: int = 128, include_dense: bool = False
) -> list[dict[str, Any]]:
    """Describe how each constant tensor of a ``.tflite`` file is stored.

    What ``EXPERIMENTAL_SPARSITY`` writes (verified with tf 2.21 on Dense and Conv2D models):

    - ``Tensor.shape`` stays the *dense* shape (Dense kernel ``(out, in)``, i.e. the Keras
      kernel transposed; Conv2D kernel OHWI, i.e. Keras HWIO transposed ``(3, 0, 1, 2)``).
    - ``Tensor.sparsity``: ``traversal_order = [0, .., rank-1]``, empty ``block_map``, every
      dimension DENSE (``dense_size`` = its size) except the last, which is SPARSE_CSR:
      ``array_segments`` are row pointers (length = product of the leading dims + 1, the last
      entry = number of stored values) and ``array_indices`` the last-dimension coordinate of
      each stored value; each is the smallest of Uint8/Uint16/Int32 vectors that fits.
    - The tensor's buffer holds only the stored values, row-major, in the tensor's type
      (4 bytes each for float32, 1 for int8), so ``stored_values = len(buffer) / itemsize``.
    - float32: stored values == the non-zero weights of the Keras kernel, exactly. int8: the
      weights are quantized first (symmetric, zero point 0), then sparsified, so a non-zero
      float weight that rounds to 0 is not stored: stored values <= Keras non-zeros.
    - A kernel with too few zeros (seen: 20 %) is stored dense (``sparsity`` is None).
    - The tensor read by the op is a separate non-constant tensor, the output of a ``DENSIFY``
      op, so the runtime holds the dense weights in RAM.

    Args:
        path: The ``.tflite`` file.
        min_elements: Skip constant tensors with fewer dense elements (biases, shape consts).
        include_dense: Also return the rebuilt dense tensor (raw stored type, 0 where nothing
            is stored) under ``"dense"``.

    Returns:
        One dict per constant tensor with at least ``min_elements`` elements, with keys
        ``subgraph``, ``name``, ``shape`` (dense), ``dtype``, ``elements`` (dense count),
        ``sparse`` (bool), ``stored_values`` (values in the buffer), ``stored_nonzero``
        (stored values != 0), ``value_bytes``, ``index_bytes`` (segments + indices bytes),
        ``quantization`` (``{"scale", "zero_point", "axis"}`` or None) and, with
        ``include_dense``, ``dense``.
    """
    model = _read_flatbuffer(path)
    stats: list[dict[str, Any]] = []
    for sg_index, subgraph in enumerate(model.subgraphs or []):
        for tensor in subgraph.tensors or []:
            buffer = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
            if buffer is None or buffer.data is None or len(buffer.data) == 0:
                continue  # not a constant
            shape = tuple(int(d) for d in (tensor.shape if tensor.shape is not None else ()))
            elements = int(np.prod(shape)) if shape else 1
            if elements < min_elements:
                continue
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
            dtype = _TFLITE_DTYPES.get(int(tensor.type))
            if dtype is None:
                logger.debug("skipping %s: tensor type %s not handled", name, tensor.type)
                continue
            raw = np.frombuffer(bytes(bytearray(buffer.data)), dtype=dtype)
            sparsity = tensor.sparsity
            index_bytes = 0
            if sparsity is not None:
                dense, addressed = _densify(raw, shape, sparsity)
                if addressed != raw.size:
                    logger.warning(
                        "%s: sparsity addresses %d values, buffer holds %d", name, addressed,
                        raw.size,
                    )
                for meta in sparsity.dimMetadata or []:
                    index_bytes += _index_bytes(meta.arraySegments)
                    index_bytes += _index_bytes(meta.arrayIndices)
            else:
                dense = raw.reshape(shape) if raw.size == elements else raw
            quant = tensor.quantization
            quantization = None
            if quant is not None and quant.scale is not None and len(quant.scale):
                quantization = {
                    "scale": np.asarray(quant.scale, dtype=np.float32),
                    "zero_point": np.asarray(
                        quant.zeroPoint if quant.zeroPoint is not None else [0], dtype=np.int64
                    ),
                    "axis": int(quant.quantizedDimension),
                }
            entry: dict[str, Any] = {
                "subgraph": sg_index,
                "name": name,
                "shape": shape,
                "dtype": dtype.name,
                "elements": elements,
                "sparse": sparsity is not None,
                "stored_values": int(raw.size),
                "stored_nonzero": int(np.count_nonzero(raw)),
                "value_bytes": int(raw.nbytes),
                "index_bytes": int(index_bytes),
                "quantization": quantization,
            }
            if include_dense:
                entry["dense"] = dense
            stats.append(entry)
    return stats


# --------------------------------------------------------------------------------------------
# Export (imports TensorFlow)
# --------------------------------------------------------------------------------------------


def _check_samples(name: str, x: np.ndarray, model: keras.Model) -> np.ndarray:
    x = np.asarray(x)
    expected = tuple(model.input_shape[1:])
    if x.ndim != len(expected) + 1 or len(x) == 0:
        raise ValueError(
            f"{name} must be a non-empty batch of shape (n, *{expected}), got {x.shape}"
        )
    for got, want in zip(x.shape[1:], expected):
        if want is not None and got != want:
            raise ValueError(
                f"{name} has sample shape {x.shape[1:]}, the model expects {expected}"
            )
    return x.astype(np.float32, copy=False)


def _representative_subset(x: np.ndarray) -> np.ndarray:
    if len(x) <= MAX_REPRESENTATIVE_SAMPLES:
        return x
    rng = np.random.default_rng(0)  # deterministic: the same data give the same file
    return x[np.sort(rng.choice(len(x), MAX_REPRESENTATIVE_SAMPLES, replace=False))]


def _convert(model: keras.Model, precision: str, representative: np.ndarray | None,
             per_channel: bool = True) -> bytes:
    import tensorflow as tf  # the model was built, so TensorFlow (and its Keras choice) is loaded

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if precision == "float32":
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    else:
        assert representative is not None
        converter.optimizations = [
            tf.lite.Optimize.DEFAULT,
            tf.lite.Optimize.EXPERIMENTAL_SPARSITY,
        ]

        def representative_dataset():  # type: ignore[no-untyped-def]
            for i in range(len(representative)):
                yield [representative[i : i + 1]]

        converter.representative_dataset = representative_dataset
        # Full-integer: every op must have an int8 kernel (conversion fails otherwise, so no
        # float op slips in). Input and output stay float32 (the converter adds QUANTIZE /
        # DEQUANTIZE), which LiteRT runs and which keeps callers free of quantization
        # parameters. int8 weights in a sparse FULLY_CONNECTED are what trips LiteRT 2.3.0's
        # XNNPACK delegate (tensorflow#60762); open_interpreter falls back for those.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # The converter's only switch for per-tensor weights (tensorflow/lite/python/lite.py).
        converter._experimental_disable_per_channel = not per_channel
    try:
        return compact_flatbuffer(bytes(converter.convert()))
    except Exception as exc:  # the converter raises ConverterError and friends
        raise ExportError(f"TFLite conversion ({precision}, sparse) failed: {exc}") from exc


def _convert_int8(model: keras.Model, representative: np.ndarray, granularity: Int8Granularity,
                  fidelity_x: np.ndarray) -> tuple[bytes, str]:
    if granularity != "auto":
        return _convert(model, "int8", representative, per_channel=granularity == "per_channel"), granularity
    per_channel = _convert(model, "int8", representative)
    per_tensor = _convert(model, "int8", representative, per_channel=False)
    keras_top1 = np.argmax(model.predict(fidelity_x, verbose=0, batch_size=256), axis=-1)
    choice = choose_int8_granularity(per_channel, per_tensor, keras_top1, fidelity_x)
    return choice.content, choice.granularity


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def export_sparse_tflite(
    model: keras.Model,
    path: str | Path,
    precision: Precision = "float32",
    representative_x: np.ndarray | None = None,
    eval_x: np.ndarray | None = None,
    eval_y: np.ndarray | None = None,
    int8_granularity: Int8Granularity = "auto",
) -> TFLiteExport:
    """Convert a (pruned) tf-keras model to a sparse ``.tflite`` file and verify it.

    Conversion uses ``TFLiteConverter.from_keras_model`` with ``Optimize.EXPERIMENTAL_SPARSITY``
    (plus ``Optimize.DEFAULT``, a representative data set of at most
    :data:`MAX_REPRESENTATIVE_SAMPLES` samples and int8 builtin ops for ``"int8"``: int8
    weights and activations, float32 input and output). Apply ``strip_pruning`` first if the
    model is wrapped by tfmot. Tensor names, the converter's metadata and empty buffers are left out
    (:func:`~fedprune.converters.tflite_size.compact_flatbuffer`); signatures stay.

    The bytes go to a temporary file next to ``path``, are fsynced, loaded by
    :func:`open_interpreter` and run on one batch (and on ``eval_x`` if given); only then is the
    file renamed onto ``path`` with ``os.replace``. On any failure the temporary file is removed
    and nothing is written at ``path`` (a file already there is left as it was).

    Args:
        model: A built single-input, single-output tf-keras model.
        path: Destination ``.tflite`` path; parent directories are created.
        precision: ``"float32"`` or ``"int8"``.
        representative_x: Calibration inputs, required for ``"int8"``.
        eval_x: Optional held-out inputs.
        eval_y: Integer class labels for ``eval_x``; accuracy is the share of samples where the
            argmax of the TFLite output over the last axis equals the label.
        int8_granularity: Weight quantization for ``"int8"``: ``"per_channel"`` (the converter's
            default), ``"per_tensor"``, or ``"auto"``: both are converted and the per-tensor file
            is kept when it is smaller and changes no more of the Keras model's top-1
            predictions (on ``eval_x``, else ``representative_x``) than per-channel does, plus
            half a percent (:func:`~fedprune.converters.tflite_size.choose_int8_granularity`).

    Returns:
        A :class:`TFLiteExport`.

    Raises:
        ValueError: Bad arguments (unknown precision, int8 without ``representative_x``,
            mismatched shapes, labels without inputs).
        ExportError: The converter failed, or the runtime could not load or run the result.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if int8_granularity not in INT8_GRANULARITIES:
        raise ValueError(f"int8_granularity must be one of {INT8_GRANULARITIES}, got {int8_granularity!r}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("export_sparse_tflite supports single-input, single-output models")
    representative = None
    if precision == "int8":
        if representative_x is None:
            raise ValueError("precision='int8' requires representative_x (calibration inputs)")
        representative = _representative_subset(
            _check_samples("representative_x", representative_x, model)
        )
    if (eval_x is None) != (eval_y is None):
        raise ValueError("give both eval_x and eval_y, or neither")
    labels = None
    if eval_x is not None:
        eval_x = _check_samples("eval_x", eval_x, model)
        labels = np.asarray(eval_y).reshape(-1)
        if len(labels) != len(eval_x):
            raise ValueError(f"eval_y has {len(labels)} labels for {len(eval_x)} samples")
        if model.output_shape[-1] in (None, 1):
            raise ValueError("accuracy (argmax) needs a multi-class output")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    granularity = None
    if representative is not None:
        fidelity_x = eval_x if eval_x is not None else representative
        content, granularity = _convert_int8(model, representative, int8_granularity, fidelity_x)
    else:
        content = _convert(model, precision, None)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())

        try:
            interpreter, runtime = open_interpreter(tmp)
            if eval_x is not None:
                probe = eval_x[:1]
            elif representative is not None:
                probe = representative[:1]
            else:
                in_shape = interpreter.get_input_details()[0]["shape"]
                probe = np.zeros((1, *in_shape[1:]), dtype=np.float32)
            out = predict_tflite(interpreter, probe)
            if not np.all(np.isfinite(out)):
                raise RuntimeError(f"non-finite output {out!r} on a probe batch")
            accuracy = None
            if eval_x is not None:
                logits = predict_tflite(interpreter, eval_x)
                accuracy = float(np.mean(np.argmax(logits, axis=-1) == labels))
            del interpreter
        except Exception as exc:
            raise ExportError(
                f"the runtime could not load and run the {precision} export: {exc}"
            ) from exc

        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    result = TFLiteExport(
        path=path,
        precision=precision,
        size_bytes=len(content),
        runtime=runtime,
        accuracy=accuracy,
        granularity=granularity,
    )
    logger.info(
        "exported %s (%s, %d bytes) verified by %s%s",
        path,
        precision if granularity is None else f"{precision} {granularity.replace('_', '-')}",
        result.size_bytes,
        runtime,
        "" if accuracy is None else f", accuracy {accuracy:.4f}",
    )
    return result
