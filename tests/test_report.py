"""The run report and the progress display, from metrics written here (no federation run)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from fedprune.aggregator.server import RoundProgress, RoundRecord
from fedprune.simulation.report import Run, write_report


def record(r: int, accuracy: float, bytes_up: int, **timing) -> RoundRecord:
    base = dict(train_s=1.0, transfer_s=2.0, encode_s=0.1, decode_s=0.2, aggregate_s=0.3, evaluate_s=0.4,
                fleet_s=5.0)
    base.update(timing)
    return RoundRecord(round=r, attempts=1, selected=10, reported=8, rejected=1, accuracy=accuracy, loss=1.0,
                       sparsity=0.1 * r, layer_sparsity={"conv/kernel": 0.1 * r, "dense/kernel": 0.2 * r},
                       pruned_this_round=True, bytes_down=1000, bytes_up=bytes_up, wall_s=10.0, train_loss=0.5,
                       received=9, offline=1, lost=0, **base)


def write_run(folder: Path, accuracies: list[float], bytes_up: int) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps(asdict(record(i + 1, a, bytes_up))) for i, a in enumerate(accuracies)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_time_parts_add_up_to_the_wall_time_and_time_to_accuracy():
    run = Run("x", [asdict(record(1, 0.5, 10)), asdict(record(2, 0.95, 10, fleet_s=3.0))])
    parts = run.time_parts()
    assert parts["training"] == [1.0, 1.0] and parts["encode/decode"] == pytest.approx([0.3, 0.3])
    assert parts["aggregation"] == pytest.approx([0.7, 0.7])
    assert [sum(p[i] for p in parts.values()) for i in range(2)] == pytest.approx([10.0, 10.0])
    assert run.time_to_accuracy(0.9) == 8.0  # fleet time of rounds 1 and 2
    assert run.time_to_accuracy(0.9, clock="wall_s") == 20.0
    assert run.time_to_accuracy(0.99) is None
    assert run.cumulative_uplink() == [10, 20]


def test_report_files_from_metrics(tmp_path):
    pruned = write_run(tmp_path / "pruned", [0.3, 0.6, 0.9], 1_000)
    dense = write_run(tmp_path / "dense", [0.4, 0.7, 0.95], 10_000)
    report = write_report(pruned, compare=[Run.load(dense, "dense FedAvg")], notes=["made by a test"])
    text = report.read_text()
    assert "- made by a test" in text and "compared with `dense FedAvg`" in text
    assert "| 3 | 10 | 8 | 1 | 1 | 0 | 0.9000 |" in text
    assert sorted(p.name for p in (pruned / "plots").iterdir()) == [
        "accuracy_vs_round.png", "accuracy_vs_uplink.png", "devices_per_round.png", "layer_sparsity.png",
        "round_time.png"]
    with open(pruned / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[2]["layer_sparsity.dense/kernel"]) == pytest.approx(0.6)


def test_report_of_a_folder_without_metrics_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)


def test_progress_bars_and_summary_table_render():
    from rich.console import Console

    from fedprune.simulation.progress import FederationProgress, summary_table

    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=False)
    with FederationProgress(2, console=console) as p:
        p.on_update(RoundProgress(1, 1, 10, 4, 1))
        p.on_round(record(1, 0.5, 1234))
    console.print(summary_table([record(1, 0.5, 1234), record(2, 0.7, 1234)]))
    text = out.getvalue()
    assert "round   1  devices   8/10  acc 0.5000" in text and "offline 1" in text
    assert "federation summary" in text and "0.7000" in text
