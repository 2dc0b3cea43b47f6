"""What the three command-line tools share: logging set-up, run folders, the per-round line."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable


def add_logging_args(parser: argparse.ArgumentParser, default: str = "WARNING") -> None:
    parser.add_argument("--log-level", default=default, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help=f"log level (default {default})")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def take_sigint_as_ctrl_c() -> None:
    """SIGINT raises KeyboardInterrupt even in a tool started with SIGINT ignored. A shell script's
    background jobs (``cmd &``) start that way.

    Without this, ``kill -INT`` does nothing there where it should stop the run cleanly (status
    130). The simulator's watch over its device processes interrupts the run with that same
    signal, so a dead device process would leave the run waiting for its round's deadline.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def load_task_or_exit(path: str, check: Callable[[Any], object] | None = None):
    """The task file, or a one-line error naming the key and exit status 2. ``check(task)`` may
    raise ``TaskError`` too: what only a higher layer can check (a strategy's registered name)."""
    import sys

    from fedprune.task import TaskError, load_task

    try:
        task = load_task(path)
        if check is not None:
            check(task)
        return task
    except TaskError as e:
        message = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def default_run_dir(task_path: str) -> Path:
    return Path("runs") / f"{Path(task_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_round(record) -> None:
    print(
        f"round {record.round:3d}  devices {record.reported:3d}/{record.selected:<3d} "
        f"accuracy {record.accuracy:.4f}  sparsity {record.sparsity:.3f} ({record.sparsity_all:.3f} of all weights)  "
        f"down {record.bytes_down:>10,} B  up {record.bytes_up:>9,} B"
        + (f"  rejected {record.rejected}" if record.rejected else "")
        + (f"  failed {len(record.device_errors)}" if record.device_errors else "")
        + (f"  mask agreement {record.mask_agreement:.3f}" if record.mask_agreement is not None else "")
        + (f"  epsilon {record.epsilon:.3f}" if record.epsilon is not None else ""),
        flush=True,
    )
    if record.layer_sparsity:  # the per-layer view: where the zeros are
        print("          layers: " + "  ".join(f"{name.split('/')[0]} {s:.3f}"
                                               for name, s in record.layer_sparsity.items()), flush=True)


def print_outcome(result) -> None:
    """The end of a run: final accuracy, sparsity over the prunable and over all weights, what was
    left dense and why, and each exported file (an int8 file not smaller than float32 says so)."""
    print(f"final accuracy {result.final_accuracy:.4f} at sparsity {result.final_sparsity:.3f} of the prunable "
          f"weights ({result.final_sparsity_all:.3f} of all {result.parameters:,} weights)")
    for layer, why in result.not_pruned.items():
        print(f"not pruned: {layer} ({why})")
    for e in result.exports:
        print(f"exported {e['path']}: {e['size_bytes']:,} bytes, TFLite accuracy {e['accuracy']:.4f} "
              f"(Keras {result.final_accuracy:.4f}) via {e['runtime']}"
              + (f"; {e['note']}" if e.get("note") else ""))
