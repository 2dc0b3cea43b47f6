"""Select Keras 2 (tf-keras) before TensorFlow is imported anywhere.

tensorflow-model-optimization supports only Keras 2, while TensorFlow 2.16+ defaults to Keras 3.
``TF_USE_LEGACY_KERAS`` must be set before the first ``import tensorflow``, so every module that
touches Keras imports ``keras`` from here instead of importing ``tf_keras`` itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedprune.quiet_start import quiet_requested, stderr_filtered  # noqa: E402

if quiet_requested():  # a command-line tool: TensorFlow's loading noise stays off the terminal
    with stderr_filtered():
        import tensorflow as tf
        import tf_keras as keras

        tf.config.list_physical_devices()  # CUDA's initialization (its cuInit error) happens here
else:
    import tensorflow as tf
    import tf_keras as keras

if os.environ["TF_USE_LEGACY_KERAS"] != "1":  # pragma: no cover - user override
    raise RuntimeError(
        "TF_USE_LEGACY_KERAS must be 1 for fedprune: tensorflow-model-optimization needs Keras 2. "
        "Unset it or set it to 1 before starting."
    )

__all__ = ["tf", "keras"]
