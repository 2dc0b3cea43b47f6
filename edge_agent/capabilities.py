"""What this device can train with, and its TFLite runtime, found without importing them.

The long-lived agent never imports TensorFlow (600 MB once imported), so whether it is installed
is asked of ``importlib.util.find_spec``, and versions of ``importlib.metadata``: nothing here
loads a module. ``trainer = "auto"`` picks Keras when TensorFlow, tf-keras and tfmot are all
installed, else the TensorFlow-free trainer (a trainable TFLite file in LiteRT or tflite-runtime)
when a TFLite runtime is, else none, and ``fedprune-agent run`` refuses to start.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass

#: What ``device.trainer`` may say.
TRAINER_CHOICES = ("auto", "keras", "litert")

#: The modules the Keras trainer's child imports.
KERAS_MODULES = ("tensorflow", "tf_keras", "tensorflow_model_optimization")
#: TFLite runtimes in the order the TensorFlow-free trainer tries them: (module, distribution).
TFLITE_RUNTIMES = (("ai_edge_litert", "ai-edge-litert"), ("tflite_runtime", "tflite-runtime"))

INSTALL_KERAS = 'pip install "fedprune[agent]"'
INSTALL_LITE = 'pip install "fedprune[agent-lite]"'


class NoTrainer(RuntimeError):
    """The device cannot train as configured; the message names what to install."""


@dataclass(frozen=True)
class Capabilities:
    """What the device announces in its presence."""

    trainer: str  # "keras" | "litert" | "none"
    runtime: str  # e.g. "ai-edge-litert 2.3.0"; "" when no TFLite runtime is installed


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a module set to None
        return False


def keras_installed() -> bool:
    """TensorFlow, tf-keras and tfmot are all installed (not imported)."""
    return all(_installed(m) for m in KERAS_MODULES)


def tflite_runtime() -> str:
    """The first installed TFLite runtime and its version (``"ai-edge-litert 2.3.0"``), or ""."""
    for module, distribution in TFLITE_RUNTIMES:
        if _installed(module):
            try:
                return f"{distribution} {importlib.metadata.version(distribution)}"
            except importlib.metadata.PackageNotFoundError:  # importable, but not installed by pip
                return distribution
    return ""


def choose_trainer(requested: str) -> Capabilities:
    """The trainer for ``device.trainer = requested`` (one of :data:`TRAINER_CHOICES`).

    Raises:
        NoTrainer: the requested trainer's packages are not installed, or (``auto``) neither
            trainer's are; the message names the extra that installs them.
        ValueError: ``requested`` is not a choice.
    """
    if requested not in TRAINER_CHOICES:
        raise ValueError(f"trainer must be one of {list(TRAINER_CHOICES)}, got {requested!r}")
    runtime = tflite_runtime()
    if requested in ("auto", "keras") and keras_installed():
        return Capabilities("keras", runtime)
    if requested == "keras":
        missing = [m for m in KERAS_MODULES if not _installed(m)]
        raise NoTrainer(f"trainer = 'keras' needs {', '.join(missing)}, which this Python does not have: "
                        f"{INSTALL_KERAS}, or train without TensorFlow: trainer = 'litert' ({INSTALL_LITE})")
    if runtime:
        return Capabilities("litert", runtime)
    if requested == "litert":
        raise NoTrainer(f"trainer = 'litert' needs a TFLite runtime (ai-edge-litert or tflite-runtime), which this "
                        f"Python does not have: {INSTALL_LITE}")
    raise NoTrainer(f"no trainer: this Python has neither TensorFlow with tf-keras and tfmot nor a TFLite runtime; "
                    f"{INSTALL_LITE} (trains without TensorFlow, for boards under 2 GB) or {INSTALL_KERAS}")
