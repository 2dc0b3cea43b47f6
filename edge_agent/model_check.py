"""A TFLite file is loaded and run once in a child process before any process of ours loads it.

LiteRT 2.3.0 is C++ that trusts its input: mutated ``.tflite`` files made it crash (SIGSEGV,
SIGABRT) or hang in ``fedprune-agent predict``, taking the caller with it. :func:`check_tflite`
hands the bytes to ``python -m fedprune.edge_agent.model_check`` on stdin; the child loads them
the way :class:`fedprune.edge_agent.inference.Predictor` does (same runtimes, same delegates),
runs one sample of zeros, and exits. A crash, a hang (past ``timeout_s``) or an error becomes a
one-line :class:`ModelCheckError`; only then is the file loaded in-process.

What it cannot catch: a file that runs on zeros but crashes on some other input. The agent's own
models are safer than that: it installs only files whose sha256 is the one its training child
loaded and ran (``export.json``), and the predictor checks each new file once per process.

Exit status of the child: 0 when the model ran, 1 with a one-line error on stderr when the
runtime refused it, 2 for a bad command line, 3 when none of the runtimes is installed (not the
file's fault: the parent raises ``RuntimeError``, as loading in-process would). TensorFlow-free
unless the only runtime is tf.lite.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading

DEFAULT_TIMEOUT_S = 60.0
_NO_RUNTIME = 3  # the child's exit status when no runtime of the list imports
# (sha256, runtimes, threads) run here -> what the child said: runtime, delegates, output shape
_verified: dict[tuple[str, tuple[str, ...], int | None], dict] = {}
_verified_lock = threading.Lock()


class ModelCheckError(ValueError):
    """A model file that crashed, hung or was refused when run in a child; the message says which."""


def check_tflite(model: bytes, runtimes: tuple[str, ...], num_threads: int | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, what: str = "the model") -> dict:
    """Load and run ``model`` once in a child process; ``ModelCheckError`` if that fails in any way.
    Returns what ran it: ``{"runtime": ..., "delegates": ..., "output_shape": [...]}``.

    Bytes already checked in this process with the same runtimes are not checked again.
    """
    key = (hashlib.sha256(model).hexdigest(), tuple(runtimes), num_threads)
    with _verified_lock:
        if key in _verified:
            return _verified[key]
    command = [sys.executable, "-m", "fedprune.edge_agent.model_check", ",".join(runtimes), str(num_threads or 0)]
    try:
        proc = subprocess.run(command, input=model, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise ModelCheckError(f"{what} did not load and run within {timeout_s:g} s (the runtime hangs on it); "
                              "not loaded") from None
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        raise ModelCheckError(f"{what} crashed the TFLite runtime ({name}) when loaded and run once; not loaded")
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        if proc.returncode == _NO_RUNTIME:
            raise RuntimeError(reason)
        raise ModelCheckError(f"{what} was refused by the TFLite runtime: {reason[:300]}")
    try:
        report = json.loads(proc.stdout.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {}
    with _verified_lock:
        _verified[key] = report
    return report


def forget_checks() -> None:
    """Check every file again (tests and the fuzzer: as a fresh process would)."""
    with _verified_lock:
        _verified.clear()


def _run_once(model: bytes, runtimes: tuple[str, ...], num_threads: int | None) -> dict:
    import numpy as np

    from fedprune.converters.tflite_export import load_interpreter, predict_tflite

    loaded = load_interpreter(model, num_threads, runtimes)
    detail = loaded.interpreter.get_input_details()[0]
    shape = tuple(max(int(d), 1) for d in detail["shape"])
    if np.prod(shape, dtype=np.int64) > 1 << 26:
        raise ValueError(f"input shape {shape} is implausibly large")
    out = predict_tflite(loaded.interpreter, np.zeros((1, *shape[1:]), np.float32))
    return {"runtime": loaded.runtime, "delegates": loaded.delegates, "output_shape": list(out.shape)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m fedprune.edge_agent.model_check RUNTIMES NUM_THREADS < model.tflite", file=sys.stderr)
        return 2
    runtimes, threads = tuple(args[0].split(",")), int(args[1]) or None
    try:
        report = _run_once(sys.stdin.buffer.read(), runtimes, threads)
    except Exception as e:  # noqa: BLE001 - whatever the runtime raises, the parent gets one line
        text = " ".join(str(e).split())
        if isinstance(e, RuntimeError) and text.startswith("no TFLite runtime"):  # load_interpreter's words
            print(text[:500], file=sys.stderr)
            return _NO_RUNTIME
        print(f"{type(e).__name__}: {text}"[:500], file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
