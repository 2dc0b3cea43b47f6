"""A run folder's life: refused when it already holds another run, continued with ``--resume``
from its last checkpoint, reported as finished when it is, and the command that continues it.

What marks a folder as holding a run: a completed round's record (``metrics.jsonl``, a
checkpoint) or its end (``summary.json``). A folder with only the ``task.json`` of a run stopped
before its first round holds nothing to keep, and may be started again.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from fedprune.aggregator.checkpoint import checkpoint_rounds
from fedprune.aggregator.records import METRICS_FILE, SUMMARY_FILE

__all__ = ["FederationError", "check_new_run", "check_resumable", "finished_summary", "interrupted",
           "last_completed_round", "refusal", "resume_command"]

CHECKPOINTS = "checkpoints"


class FederationError(RuntimeError):
    """The federation cannot go on (no devices, a round failed all its retries, a run folder that
    holds another run)."""


def last_completed_round(run_dir: Path) -> int:
    """The last round the folder has a checkpoint of (0: none)."""
    rounds = checkpoint_rounds(Path(run_dir) / CHECKPOINTS)
    return rounds[-1] if rounds else 0


def finished_summary(run_dir: Path) -> dict | None:
    """The run's summary.json when the run finished (None otherwise, or when it is unreadable)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None


def check_new_run(run_dir: Path) -> None:
    """``FederationError`` if ``run_dir`` holds a run already: a new run would mix its records
    with that one's (metrics.jsonl twice over, a report "after 8 rounds" of a 4-round task)."""
    run_dir = Path(run_dir)
    found = [name for name in (METRICS_FILE, SUMMARY_FILE) if (run_dir / name).is_file()]
    if last_completed_round(run_dir):
        found.append(f"{CHECKPOINTS}/ (round {last_completed_round(run_dir)})")
    if found:
        raise FederationError(f"{run_dir} already holds a run ({', '.join(found)}); continue it with --resume, "
                              "or give another --run-dir")


def check_resumable(run_dir: Path) -> None:
    """``FederationError`` unless ``run_dir`` has a checkpoint to continue from."""
    if not checkpoint_rounds(Path(run_dir) / CHECKPOINTS):
        raise FederationError(f"--resume: {run_dir} has no completed round to continue from (no checkpoint in "
                              f"{Path(run_dir) / CHECKPOINTS}); start the run again without --resume")


def resume_command(prog: str, argv: list[str], run_dir: Path) -> str:
    """The command line that continues the run: ``argv`` as given (broker, port, connection,
    status page and all), with ``--run-dir`` naming this run and ``--resume``, quoted for a shell."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--run-dir":
            skip = True
        elif not (arg == "--resume" or arg.startswith("--run-dir=")):
            kept.append(arg)
    return shlex.join([prog, *kept, "--run-dir", str(run_dir), "--resume"])


def refusal(run_dir: Path, resume: bool) -> tuple[int, str] | None:
    """What a command-line tool says, and its exit status, when it must not start a run in
    ``run_dir``: a folder that holds another run (without ``--resume``), a run that finished
    already (``--resume``: said, exit 0) or one with no completed round to continue. None: go on."""
    if resume:
        summary = finished_summary(run_dir)
        if summary is not None:
            return 0, (f"{run_dir} finished already: {summary.get('rounds', '?')} rounds, final accuracy "
                       f"{summary.get('final_accuracy', float('nan')):.4f} (summary.json); nothing to resume")
    try:
        (check_resumable if resume else check_new_run)(run_dir)
    except FederationError as e:
        return 2, f"error: {e}"
    return None


def interrupted(prog: str, argv: list[str], run_dir: Path) -> str:
    """What to tell a user who stopped a run: the command that continues it, pasted as is, or
    that there is nothing to continue."""
    done = last_completed_round(run_dir)
    if not done:
        return (f"interrupted before any round completed: nothing to resume; the same command starts the run "
                f"again in {run_dir}")
    return f"interrupted after round {done}; continue with:\n  {resume_command(prog, argv, run_dir)}"
