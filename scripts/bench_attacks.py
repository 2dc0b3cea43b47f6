"""Benchmark: hostile devices against FedAvg and each robust aggregation; a table, then one JSON line.

    .venv/bin/python scripts/bench_attacks.py --task examples/robust.toml --devices 10

Runs the task clean (FedAvg), then with a fraction of the devices sending sign-flipped updates
scaled up (fedprune.simulation.attacks), aggregated with FedAvg and with each robust option in turn. Every
device takes part in every round, so each round has exactly that fraction of hostile updates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedprune.simulation.attacks import Attack, every_device_task, robust_aggregations  # noqa: E402
from fedprune.cli_common import setup_logging  # noqa: E402
from fedprune.simulation.cli import run_simulation  # noqa: E402
from fedprune.task import Task, load_task  # noqa: E402


def attack_scenarios(task: Task, devices: int, attack: Attack, clip_norm: float,
                     broker_url: str | None = None) -> list[dict[str, Any]]:
    """Run clean FedAvg, then the attack under FedAvg and under each robust option; one row each
    (scenario, final accuracy, points against the clean run, wall time)."""
    hostile = len(attack.hostile_devices(devices, task.seed))
    runs: list[tuple[str, Attack | None, dict[str, Any]]] = [("clean, fedavg", None, {}),
                                                              (f"{attack.kind} x{attack.scale:g}, fedavg", attack, {})]
    runs += [(f"{attack.kind} x{attack.scale:g}, {name}", attack, agg)
             for name, agg in robust_aggregations(devices, hostile, clip_norm).items()]
    rows: list[dict[str, Any]] = []
    for name, scenario_attack, aggregation in runs:
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            result = run_simulation(every_device_task(task, devices, aggregation), devices, Path(tmp) / "run",
                                    broker_url, export_tflite=False, attack=scenario_attack)
        rows.append({"scenario": name, "aggregation": aggregation, "hostile": hostile if scenario_attack else 0,
                     "rounds": len(result.rounds), "final_accuracy": round(result.final_accuracy, 4),
                     "wall_s": round(time.monotonic() - start, 1)})
        rows[-1]["vs_clean_points"] = round(100 * (rows[-1]["final_accuracy"] - rows[0]["final_accuracy"]), 2)
        print(f"{name:34s} accuracy {rows[-1]['final_accuracy']:.4f}  vs clean {rows[-1]['vs_clean_points']:+6.2f} "
              f"points  ({rows[-1]['wall_s']:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="examples/robust.toml")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.2, help="fraction of hostile devices (default 0.2)")
    parser.add_argument("--scale", type=float, default=10.0, help="sign flip scale (default 10)")
    parser.add_argument("--clip-norm", type=float, default=5.0,
                        help="clip norm of the clipping scenario (default 5: about an honest update's norm)")
    parser.add_argument("--dirichlet", type=float, metavar="ALPHA",
                        help="split the data non-IID, Dirichlet(ALPHA), instead of as the task says")
    parser.add_argument("--broker", help="mqtt://host:port (default: the embedded broker)")
    args = parser.parse_args()
    setup_logging("ERROR")
    task = load_task(args.task)
    if args.dirichlet:
        task = dataclasses.replace(task, data=dataclasses.replace(task.data, partition="dirichlet",
                                                                  alpha=args.dirichlet)).check()
    attack = Attack("sign_flip", args.fraction, args.scale)
    rows = attack_scenarios(task, args.devices, attack, args.clip_norm, args.broker)
    print()
    print("| scenario | final accuracy | vs clean (points) | wall s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scenario']} | {r['final_accuracy']:.4f} | {r['vs_clean_points']:+.2f} | {r['wall_s']:.0f} |")
    print(json.dumps({"benchmark": "attacks", "task": args.task, "partition": task.data.partition,
                      "alpha": task.data.alpha if task.data.partition == "dirichlet" else None,
                      "devices": args.devices, "attack": attack.kind,
                      "fraction": args.fraction, "scale": args.scale, "clip_norm": args.clip_norm, "scenarios": rows}))


if __name__ == "__main__":
    main()
