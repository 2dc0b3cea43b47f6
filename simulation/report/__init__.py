"""The run report: Markdown with PNG figures and the metrics as CSV, written into a run folder.

``write_report(run_dir)`` reads the run's ``metrics.jsonl`` (and ``summary.json``); pass other
runs of the same task (say dense FedAvg beside pruned) to draw them on the same axes.
``python -m fedprune.simulation.report RUN_DIR [--compare OTHER_RUN_DIR]`` does the same from a shell.
"""

from fedprune.simulation.report.document import write_report
from fedprune.simulation.report.metrics import Run

__all__ = ["Run", "write_report"]
