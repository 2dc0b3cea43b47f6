"""Benchmark: a simulated federation from a task file; prints per-round figures, then one JSON line.

    .venv/bin/python scripts/bench_federation.py --task examples/digits.toml --devices 20

Reports final held-out accuracy (Keras and the exported TFLite models), final sparsity, bytes down
and up per round, bytes per update against a dense float32 update, wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedprune.cli_common import print_round, setup_logging  # noqa: E402
from fedprune.simulation.cli import run_simulation  # noqa: E402
from fedprune.task import load_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="examples/digits.toml")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--broker", help="mqtt://host:port (default: the embedded broker)")
    args = parser.parse_args()
    setup_logging("WARNING")
    task = load_task(args.task)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_simulation(task, args.devices, Path(tmp) / "run", args.broker, on_round=print_round)
    wall = time.monotonic() - start
    dense_update = 4 * result.parameters
    last = result.rounds[-1]
    per_update_last = last.bytes_up / max(last.reported, 1)
    figures = {
        "benchmark": "federation",
        "task": args.task,
        "devices": args.devices,
        "rounds": len(result.rounds),
        "final_accuracy": round(result.final_accuracy, 4),
        "final_sparsity": round(result.final_sparsity, 4),
        "tflite": {e["precision"]: {"bytes": e["size_bytes"], "accuracy": round(e["accuracy"], 4)}
                   for e in result.exports},
        "parameters": result.parameters,
        "dense_float32_update_bytes": dense_update,
        "last_round_bytes_per_update": round(per_update_last),
        "last_round_update_ratio_vs_dense_float32": round(dense_update / per_update_last, 2),
        "bytes_up_per_round": [r.bytes_up for r in result.rounds],
        "bytes_down_per_round": [r.bytes_down for r in result.rounds],
        "total_bytes_up": sum(r.bytes_up for r in result.rounds),
        "total_bytes_down": sum(r.bytes_down for r in result.rounds),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(figures))



if __name__ == "__main__":
    main()
