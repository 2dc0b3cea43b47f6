"""The same task and seed give the same run (issue 17): two simulations of one task give
identical accuracies in metrics.jsonl, round by round, although their devices train and their
updates arrive in whatever order thread timing gives (each device's training is seeded by device
and round, the aggregation is order-independent)."""

from __future__ import annotations

import json

from fedprune.simulation.cli import run_simulation
from test_fleet import fleet_task


def _accuracies(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["accuracy"], r["loss"], r["reported"]) for r in records]


def test_two_runs_with_the_same_seed_give_identical_accuracies(tmp_path):
    task = fleet_task(model={"factory": "fedprune.models:digits_cnn"},
                      federation={"rounds": 3, "devices_per_round": 8, "min_devices": 8},
                      training={"local_epochs": 1, "batch_size": 16, "learning_rate": 0.002, "optimizer": "adam"},
                      pruning={"final_sparsity": 0.5, "begin_round": 1, "end_round": 3})
    runs = []
    for name in ("a", "b"):
        run_simulation(task, 12, tmp_path / name, export_tflite=False)  # each on its own embedded broker
        runs.append(_accuracies(tmp_path / name))
    assert runs[0] == runs[1]
    assert len(runs[0]) == 3 and all(reported == 8 for *_, reported in runs[0])
