"""Live progress for a federation run in a terminal (rich): a bar for the rounds, a bar for the
updates of the open round, one line per finished round, and a summary table at the end."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


#: Columns for a console that is not a terminal (a log file, a pipe): rich would cut lines and
#: tables to 80 ("rou…", "acc 0.28…"); this is wide enough for the summary table and a round line.
LOG_WIDTH = 200


def log_console() -> Console:
    """A console for stdout: the terminal's width in a terminal, ``LOG_WIDTH`` columns and no
    wrapping of long lines elsewhere, so a log holds every table cell and line whole."""
    console = Console()
    return console if console.is_terminal else Console(width=LOG_WIDTH, soft_wrap=True)


class FederationProgress:
    """``with FederationProgress(rounds) as p: run(on_round=p.on_round, on_update=p.on_update)``."""

    def __init__(self, rounds: int, console: Console | None = None) -> None:
        self.console = console or log_console()
        self._progress = Progress(
            TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(), console=self.console, transient=False,
        )
        self._rounds = self._progress.add_task("rounds", total=rounds, note="")
        self._updates = self._progress.add_task("updates (round 1)", total=None, note="")

    def __enter__(self) -> "FederationProgress":
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def on_update(self, p: Any) -> None:
        """An ``fedprune.aggregator.server.RoundProgress``: updates in so far for the open round."""
        self._progress.update(self._updates, description=f"updates (round {p.round})", total=p.selected,
                              completed=p.reported + p.rejected,
                              note=f"{p.rejected} rejected" if p.rejected else "")

    def on_round(self, r: Any) -> None:
        """An ``fedprune.aggregator.server.RoundRecord``: one line, and the rounds bar moves on."""
        self._progress.update(self._rounds, advance=1, note=f"accuracy {r.accuracy:.4f}")
        self.console.print(round_line(r))


def round_line(r: Any) -> str:
    missing = f"  offline {r.offline}  lost {r.lost}" if (r.offline or r.lost) else ""
    return (f"round {r.round:3d}  devices {r.reported:3d}/{r.selected:<3d} acc {r.accuracy:.4f}  "
            f"sparsity {r.sparsity:.3f} ({r.sparsity_all:.3f} of all)  up {r.bytes_up:>11,} B  {r.wall_s:5.1f} s"
            + (f"  rejected {r.rejected}" if r.rejected else "")
            + (f"  failed {len(r.device_errors)}" if r.device_errors else "") + missing)


def summary_table(rounds: list[Any], title: str = "federation summary") -> Table:
    """The rounds of a run as a table for the terminal."""
    table = Table(title=title)
    for name in ("round", "devices", "lost", "acc", "sparsity", "of all", "MB up", "wall s", "fleet s", "train s",
                 "xfer s"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rounds:
        table.add_row(str(r.round), f"{r.reported}/{r.selected}", str(r.lost), f"{r.accuracy:.4f}",
                      f"{r.sparsity:.3f}", f"{r.sparsity_all:.3f}", f"{r.bytes_up / 1e6:.2f}", f"{r.wall_s:.1f}",
                      f"{r.fleet_s:.1f}", f"{r.train_s:.2f}", f"{r.transfer_s:.2f}")
    return table
