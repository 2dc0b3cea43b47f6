"""The training child: ``python -m fedprune.edge_agent.train_worker WORK_DIR``.

Started by :class:`fedprune.edge_agent.child_trainer.ChildProcessTrainer` for one round, and gone when
the round's work is done, taking TensorFlow's memory with it. It reads the job from
``WORK_DIR`` (:mod:`fedprune.edge_agent.jobfiles`), trains with :class:`fedprune.edge_agent.trainer.KerasTrainer`,
writes the result, then exports the round's global model (the task's weights) to a sparse
TFLite file that LiteRT has loaded and run, for the agent to install.

With the job's ``trainer = "litert"`` it trains with the trainable TFLite file the agent put in
``WORK_DIR`` (:class:`fedprune.edge_agent.litert_trainer.LiteRTTrainer`) and never imports
TensorFlow; it exports nothing (converting a model to TFLite needs TensorFlow).

Exit status: 0 with a result (an export failure is logged, not fatal: the update matters more),
1 with ``error.json`` saying why training failed, 2 for a bad command line.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

from fedprune.architecture import register_custom_layers
from fedprune.edge_agent import jobfiles
from fedprune.edge_agent.budgets import peak_rss_mb

log = logging.getLogger("fedprune.edge_agent.train_worker")

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when the agent dies (a power cut needs no help, a SIGKILL of
    the agent does): an orphaned child would hold TensorFlow's memory for nothing."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable")
    if os.getppid() != parent_pid:  # the agent died before prctl took effect
        raise SystemExit("the agent that started this training child is gone")


def _peak_rss_mb() -> float:
    return peak_rss_mb() or 0.0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / jobfiles.JOB).is_file():
        print("usage: python -m fedprune.edge_agent.train_worker WORK_DIR (with job.json and task.bin in it)",
              file=sys.stderr)
        return 2
    folder = Path(args[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    architecture, task, spec = jobfiles.read_job(folder)
    _die_with_parent(spec.parent_pid)
    register_custom_layers(spec.custom_layers)  # the agent's own config, handed down
    try:
        from fedprune.data import load_device_data

        x, y = load_device_data(spec.data_path, spec.data_options)  # before TensorFlow: a bad file fails in a second

        if spec.trainer == "litert":
            from fedprune.edge_agent.litert_trainer import LiteRTTrainer  # a TFLite runtime, no TensorFlow

            result = LiteRTTrainer((folder / jobfiles.TRAINABLE).read_bytes()).train(architecture, task, x, y)
        else:
            from fedprune.edge_agent.trainer import KerasTrainer  # TensorFlow: this process only

            result = KerasTrainer().train(architecture, task, x, y)
        result.metrics["train_peak_rss_mb"] = _peak_rss_mb()
        jobfiles.write_result(folder, result)
    except Exception as e:  # noqa: BLE001 - whatever it is, the aggregator hears of it
        log.exception("training for round %d failed", task.round)
        jobfiles.write_error(folder, f"{type(e).__name__}: {e}")
        return 1
    log.info("round %d: result written (peak RSS %.0f MB)", task.round, _peak_rss_mb())
    if spec.export_precision != "off" and spec.trainer == "keras":
        try:
            _export(folder, architecture, task, spec, x, y)
        except Exception:  # noqa: BLE001 - the device keeps its previous model
            log.exception("round %d: exporting the global model to TFLite failed", task.round)
    return 0


def _export(folder: Path, architecture, task, spec: jobfiles.JobSpec, x, y) -> None:
    """The task's global model as a sparse TFLite file, verified in LiteRT, and its description."""
    import numpy as np

    from fedprune.architecture import model_from_architecture_json
    from fedprune.converters.tflite_export import export_sparse_tflite
    from fedprune.edge_agent.model_store import file_sha256
    from fedprune.fileio import atomic_write_json
    from fedprune.models import set_layer_weights

    digest = jobfiles.weights_digest(task.weights)
    if digest == spec.skip_export_digest:
        log.info("round %d: global model unchanged since the installed one; no export", task.round)
        return
    model = model_from_architecture_json(architecture.model_json)
    set_layer_weights(model, task.weights)
    export = export_sparse_tflite(model, folder / jobfiles.MODEL, spec.export_precision,
                                  representative_x=x, eval_x=x, eval_y=y)
    masked = [m for m in task.masks if m is not None]
    sparsity = float(sum(int((~m).sum()) for m in masked) / max(1, sum(m.size for m in masked)))
    atomic_write_json(folder / jobfiles.EXPORT, {
        "round": task.round, "precision": spec.export_precision, "sparsity": sparsity,
        "source_digest": digest, "runtime": export.runtime,
        "sha256": file_sha256(folder / jobfiles.MODEL),  # the bytes LiteRT loaded and ran: all the agent installs
        "local_accuracy": None if export.accuracy is None else float(np.round(export.accuracy, 4)),
    })
    log.info("round %d: exported %s (%d bytes, sparsity %.3f, peak RSS %.0f MB)", task.round,
             folder / jobfiles.MODEL, export.size_bytes, sparsity, _peak_rss_mb())


if __name__ == "__main__":
    sys.exit(main())
