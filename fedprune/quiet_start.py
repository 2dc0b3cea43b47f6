"""A quiet start for the command-line tools: TensorFlow's start-up chatter kept off the terminal.

TensorFlow 2.21 writes to file descriptor 2 from C++ as it loads, before anything in Python can
filter it: absl's "All log messages before absl::InitializeLog() is called are written to STDERR",
an oneDNN note, "Could not find cuda drivers on your machine", and on a machine without a GPU
driver "failed call to cuInit: ... UNKNOWN ERROR (303)". ``TF_CPP_MIN_LOG_LEVEL`` does not reach the
absl lines (measured: they appear at levels 1, 2 and 3), and ``CUDA_VISIBLE_DEVICES`` set to "" or
"-1" does not stop the cuInit error. So the tools load TensorFlow with file descriptor 2 on a pipe,
and a thread passes every line on to the real stderr as it comes, except those: nothing else is
lost or held back (a log line another thread writes meanwhile appears when written).

Only the tools ask for it (``request_quiet_start``, inherited by their child processes through
the environment); a program that imports fedprune as a library sees TensorFlow as it is.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["QUIET_START_ENV", "is_noise", "quiet_requested", "request_quiet_start", "stderr_filtered"]

QUIET_START_ENV = "FEDPRUNE_QUIET_START"

_NOISE = re.compile(
    rb"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|^[IWE]\d{4} [\d:. ]+\d+ (port|cudart_stub|cuda_platform|cuda_executor|cuda_diagnostics|cpu_feature_guard"
    rb"|cuda_dnn|cuda_fft|cuda_blas|dso_loader)\.cc:\d+\]"
    # Converting and checking a TFLite file: LiteRT's and the converter's notes on stderr.
    rb"|^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    rb"|^fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+"
)


def request_quiet_start() -> None:
    """Ask for TensorFlow to be loaded quietly in this process and the processes it starts (the
    command-line tools call it first thing). A user's own setting of the variable wins."""
    os.environ.setdefault(QUIET_START_ENV, "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def quiet_requested() -> bool:
    return os.environ.get(QUIET_START_ENV, "") == "1"


def is_noise(line: bytes) -> bool:
    """Whether ``line`` is one of the lines TensorFlow writes as it loads."""
    return bool(_NOISE.search(line))


@contextmanager
def stderr_filtered() -> Iterator[None]:
    """Within the block, file descriptor 2 is a pipe whose lines go on to the real stderr as they
    come, less TensorFlow's loading noise; if the block raises, the noise follows (it may say why)."""
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)  # fd 2 is now the pipe's only writer: restoring it ends the pipe
    dropped: list[bytes] = []
    forward = threading.Thread(target=_forward, args=(read_end, real, dropped), name="stderr-filter", daemon=True)
    forward.start()
    failed = True
    try:
        yield
        failed = False
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)
        forward.join(timeout=10)
        if failed and dropped:
            os.write(real, b"".join(dropped))
        os.close(real)


def _forward(read_end: int, real: int, dropped: list[bytes]) -> None:
    """Pass the pipe's lines on to ``real`` as they come, keeping the noise in ``dropped``."""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        pending = b""
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                _pass_on(line + b"\n", real, dropped)
        if pending:
            _pass_on(pending, real, dropped)


def _pass_on(line: bytes, real: int, dropped: list[bytes]) -> None:
    if is_noise(line):
        dropped.append(line)
    else:
        os.write(real, line)
