"""Benchmark: the aggregator's CPU per round with 0 and with 2 aggregation workers (issue 17).

For each worker count: a private Mosquitto, N simulated digits devices in a child process
(``bench_fleet.py --phase devices``: real Keras training, every byte over the broker), and the
aggregator in another child process with ``workers=W``, every device selected every round (N
updates a round). The aggregator's (the coordinator's) CPU time per round is read with
``time.process_time()`` at each round's end: its own threads, not its workers' processes, whose
CPU is reported apart (from ``/proc``). Round 1 (tracing, waiting for devices) is left out.
Results identical: the rounds' held-out accuracy and loss and the final global weights, compared
to the bit.

    .venv/bin/python scripts/bench_workers.py --devices 1000 --rounds 3

Prints a line per run, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and tests/brokers.py for Mosquitto


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, from ``/proc/<pid>/stat``."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase_aggregator(args) -> dict:
    """The aggregator of one run, the devices in a child process."""
    import multiprocessing

    from fedprune.aggregator.checkpoint import load_latest_checkpoint
    from fedprune.aggregator.server import Aggregator
    from fedprune.converters.signing import SigningKey
    from fedprune.data import load_dataset
    from bench_fleet import _scale_task

    args.task = Path(args.task)
    task = _scale_task(args)
    key = SigningKey.generate()
    devices = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "bench_fleet.py"), "--phase", "devices", "--broker-url",
         args.broker_url, "--task", str(args.task), "--devices", str(args.devices), "--per-round",
         str(args.devices), "--rounds", str(args.rounds), "--aggregator-key", key.public.text],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    rounds: list[dict] = []
    marks = [time.process_time()]

    def on_round(record) -> None:
        now = time.process_time()
        workers = [p for p in multiprocessing.active_children() if "aggregation-worker" in p.name]
        rounds.append({"round": record.round, "reported": record.reported, "accuracy": record.accuracy,
                       "loss": record.loss, "wall_s": record.wall_s, "coordinator_cpu_s": now - marks[-1],
                       "workers_cpu_s_total": sum(_proc_cpu_s(p.pid) for p in workers)})
        marks.append(now)
        print(f"  workers={args.workers} round {record.round}: {record.reported} updates, coordinator CPU "
              f"{now - marks[-2]:.2f} s, wall {record.wall_s:.1f} s, accuracy {record.accuracy:.4f}", flush=True)

    try:
        for line in devices.stdout:
            if line.strip() == "ready":
                break
        else:
            raise RuntimeError("the devices' process ended before its devices connected")
        ds = load_dataset(task.data.dataset, task.data.path, task.data.test_fraction, task.seed, task.data.options)
        run_dir = Path(args.run_dir)
        Aggregator(task, ds, args.broker_url, run_dir, on_round=on_round, export_tflite=False, signing_key=key,
                   workers=args.workers).run()
        devices.communicate(timeout=300)
    finally:
        if devices.poll() is None:
            devices.kill()
    weights = load_latest_checkpoint(run_dir / "checkpoints").weights
    import numpy as np

    np.savez(run_dir / "final_weights.npz", *weights)
    return {"workers": args.workers, "rounds": rounds}


def _run(args, workers: int, run_dir: Path) -> dict:
    from brokers import MosquittoProcess

    with MosquittoProcess() as broker:
        cmd = [sys.executable, __file__, "--phase", "aggregator", "--broker-url", broker.url, "--task", str(args.task),
               "--devices", str(args.devices), "--rounds", str(args.rounds), "--workers", str(workers),
               "--run-dir", str(run_dir)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"the run with {workers} workers failed with exit status {proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=ROOT / "examples" / "digits.toml")
    parser.add_argument("--devices", type=int, default=1000, help="devices, all selected every round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="the worker count compared with none")
    parser.add_argument("--keep", type=Path, help="keep the two runs' folders (metrics.jsonl, checkpoints) here")
    parser.add_argument("--phase", choices=["aggregator"], help=argparse.SUPPRESS)
    parser.add_argument("--broker-url", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        args.per_round = args.devices
        print(json.dumps(phase_aggregator(args)))
        return 0
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 is left out of the figures")
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        runs = {w: _run(args, w, folder / f"workers-{w}") for w in (0, args.workers)}
        weights = {w: np.load(folder / f"workers-{w}" / "final_weights.npz") for w in runs}
        same_weights = all(np.array_equal(weights[0][k], weights[args.workers][k]) for k in weights[0].files)
    later = {w: [r for r in run["rounds"] if r["round"] > 1] for w, run in runs.items()}
    cpu = {w: sum(r["coordinator_cpu_s"] for r in rs) / len(rs) for w, rs in later.items()}
    curves = {w: [(r["round"], r["accuracy"], r["loss"], r["reported"]) for r in run["rounds"]]
              for w, run in runs.items()}
    out = {
        "devices": args.devices, "updates_per_round": args.devices, "rounds": args.rounds,
        "coordinator_cpu_s_per_round": {str(w): cpu[w] for w in cpu},
        "share_of_one_process": cpu[args.workers] / cpu[0],
        "target_share": 0.60,
        "workers_cpu_s_total": runs[args.workers]["rounds"][-1]["workers_cpu_s_total"],
        "wall_s_per_round": {str(w): sum(r["wall_s"] for r in rs) / len(rs) for w, rs in later.items()},
        "identical_accuracies": curves[0] == curves[args.workers],
        "identical_weights": same_weights,
        "reported": {str(w): [r["reported"] for r in run["rounds"]] for w, run in runs.items()},
    }
    print(f"coordinator CPU per round: {cpu[0]:.2f} s alone, {cpu[args.workers]:.2f} s with {args.workers} workers "
          f"({out['share_of_one_process']:.0%} of one process's); results identical: "
          f"{out['identical_accuracies'] and same_weights}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
