"""The trainable TFLite files a device received, shared by its protocol session and its trainer.

The session (``DeviceSession``) puts each file the aggregator publishes here as it arrives (on the
network thread); the TensorFlow-free trainer takes the file of the task's architecture from here
(on the training worker). One store may serve many simulated devices of one federation. Only the
latest file of each architecture is kept, and only a few architectures (structured pruning
replaces the architecture; the older files are not needed again).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from fedprune.converters.model_messages import TrainableModel

MAX_ARCHITECTURES = 2


class TrainableFiles:
    """Thread-safe: the latest trainable file per architecture digest."""

    def __init__(self) -> None:
        self._files: OrderedDict[str, TrainableModel] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, model: TrainableModel) -> bool:
        """Keep ``model`` as its architecture's file; False if that very file was there already."""
        with self._lock:
            old = self._files.pop(model.architecture_digest, None)
            self._files[model.architecture_digest] = model
            while len(self._files) > MAX_ARCHITECTURES:
                self._files.popitem(last=False)
            return old is None or old.sha256 != model.sha256

    def get(self, architecture_digest: str) -> TrainableModel | None:
        with self._lock:
            return self._files.get(architecture_digest)
