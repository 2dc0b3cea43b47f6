"""Benchmark: federations whose devices train without TensorFlow, against the same federations with
Keras devices (issue 15's targets).

    .venv/bin/python scripts/bench_tf_free.py                          # digits and MNIST-1D, seeds 0 1 2
    .venv/bin/python scripts/bench_tf_free.py --tasks digits --seeds 0 --fleets keras litert
    .venv/bin/python scripts/bench_tf_free.py --tasks none --agents     # only the two real agents

**Federations** (``fedprune-simulate``'s ``run_simulation``, 20 devices on the embedded broker, each
a real MQTT client): the example task file (``examples/<task>.toml``) as it is but its seed and
its ``[[simulation.profiles]]``: every device ``trainer = "keras"``, every device ``"litert"`` (the
aggregator's trainable TFLite file in LiteRT, no TensorFlow on the device's side), or ``mixed``
(two profiles of weight 1, so each device draws one: the split is printed). One run per process,
one after another (the host's two cores are not shared between runs). Per run: the final held-out
accuracy, the mean of the last five rounds, the median over rounds of the fleet's training time
(``train_s``: the slowest selected device's), and the wall time.

**Agents** (``--agents``): ``fedprune-agent run`` as a board runs it, once with ``--trainer keras``
and once with ``--trainer litert`` in an environment where TensorFlow cannot be imported at all,
each the only device of a digits federation (the example's settings, device 0's shard of its
partition) of ``--agent-rounds`` rounds; from the agent's log, per round: task to update sent
(the training child's start, imports and training), and the child's peak RSS (VmHWM) and wall time.

Targets: each TF-free fleet and each mixed fleet within 1 point of the Keras fleet of the same
seed (judged on the mean over seeds, every seed shown); the TF-free training child at most 120 MB;
a round's training at most 2x Keras's. Last line: JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXAMPLES = {"digits": ROOT / "examples" / "digits.toml", "mnist1d": ROOT / "examples" / "mnist1d.toml"}
FLEETS = ("keras", "litert", "mixed")
DEVICES = 20
TENSORFLOW = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "keras")


# --- one federation, in a process of its own -----------------------------------------------------

def fleet_task(task_name: str, seed: int, fleet: str):
    from fedprune.task import DeviceProfile, load_task

    task = load_task(EXAMPLES[task_name])
    kinds = ("keras", "litert") if fleet == "mixed" else (fleet,)
    profiles = tuple(DeviceProfile(name=kind, trainer=kind) for kind in kinds)
    return dataclasses.replace(task, seed=seed, simulation=dataclasses.replace(task.simulation, profiles=profiles))


def run_one(task_name: str, seed: int, fleet: str, out: Path) -> None:
    from fedprune.simulation.cli import run_simulation
    from fedprune.simulation.fleet import draw_behaviours

    task = fleet_task(task_name, seed, fleet)
    split = {kind: sum(b.profile.trainer == kind for b in draw_behaviours(task.simulation, range(DEVICES), seed))
             for kind in ("keras", "litert")}
    start = time.monotonic()
    result = run_simulation(task, DEVICES, out / "run", export_tflite=False)
    wall = time.monotonic() - start
    rounds = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    accuracies = [r["accuracy"] for r in rounds]
    print(json.dumps({
        "task": task_name, "seed": seed, "fleet": fleet, "split": split, "rounds": len(rounds),
        "final_accuracy": round(result.final_accuracy, 4), "last5_mean": round(statistics.fmean(accuracies[-5:]), 4),
        "median_round_train_s": round(statistics.median(r["train_s"] for r in rounds), 3),
        "median_round_wall_s": round(statistics.median(r["wall_s"] for r in rounds), 3),
        "wall_s": round(wall, 1), "final_sparsity": round(result.final_sparsity, 3),
    }), flush=True)


def federations(tasks: list[str], seeds: list[int], fleets: list[str], work: Path) -> list[dict]:
    out = []
    for task_name in tasks:
        for seed in seeds:
            for fleet in fleets:
                folder = work / f"{task_name}-{seed}-{fleet}"
                folder.mkdir(parents=True, exist_ok=True)
                proc = subprocess.run([sys.executable, __file__, "--one", task_name, str(seed), fleet, str(folder)],
                                      capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    raise RuntimeError(f"{task_name} seed {seed} {fleet}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{task_name} seed {seed} {fleet:6} ({row['split']['keras']} keras / {row['split']['litert']} "
                      f"litert): final {row['final_accuracy']:.4f}, last 5 {row['last5_mean']:.4f}, "
                      f"round train {row['median_round_train_s']:.2f} s, {row['wall_s']:.0f} s", flush=True)
                out.append(row)
    return out


def compare(rows: list[dict]) -> dict:
    """Per task: each fleet's accuracy against the Keras fleet of the same seed, and the mean."""
    out: dict = {}
    for task_name in sorted({r["task"] for r in rows}):
        by = {(r["seed"], r["fleet"]): r for r in rows if r["task"] == task_name}
        seeds = sorted({s for s, _ in by})
        entry: dict = {"seeds": seeds}
        for fleet in ("litert", "mixed"):
            pairs = [(by[(s, fleet)], by[(s, "keras")]) for s in seeds if (s, fleet) in by and (s, "keras") in by]
            if not pairs:
                continue
            final = [round(100 * (a["final_accuracy"] - k["final_accuracy"]), 2) for a, k in pairs]
            last5 = [round(100 * (a["last5_mean"] - k["last5_mean"]), 2) for a, k in pairs]
            ratio = [round(a["median_round_train_s"] / k["median_round_train_s"], 2) for a, k in pairs]
            entry[fleet] = {"final_points_vs_keras": final, "mean_final_points": round(statistics.fmean(final), 2),
                            "last5_points_vs_keras": last5, "mean_last5_points": round(statistics.fmean(last5), 2),
                            "round_train_ratio": ratio, "within_1_point": abs(statistics.fmean(final)) <= 1.0}
        out[task_name] = entry
    return out


# --- real agents: the training child of each trainer -----------------------------------------------

def _without(folder: Path, modules: tuple[str, ...]) -> dict:
    """An environment in which ``modules`` cannot be imported (nor found): a sitecustomize."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(f"import sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n")
    return {**os.environ, "PYTHONPATH": str(folder), "PYTHONUNBUFFERED": "1"}


def _stamp(line: str) -> float | None:
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def agent_rounds(log: Path) -> list[dict]:
    """Per round, from the agent's log: task taken to update sent, and how the child ended."""
    rounds: dict[int, dict] = {}
    current = None
    for line in log.read_text(errors="replace").splitlines():
        if m := re.search(r"round (\d+): training in child pid", line):
            current = int(m.group(1))
            rounds[current] = {"round": current, "_start": _stamp(line)}
        elif (m := re.search(r"sent update for round (\d+)", line)) and int(m.group(1)) in rounds:
            r = rounds[int(m.group(1))]
            r["task_to_update_s"] = round(_stamp(line) - r["_start"], 2)
        elif (m := re.search(r"training child exited \(code (-?\d+)\) after ([\d.]+) s, peak RSS ([\d.]+) MB", line)) \
                and current is not None:
            rounds[current].update(child_exit=int(m.group(1)), child_s=float(m.group(2)),
                                   child_peak_rss_mb=float(m.group(3)))
    return [{k: v for k, v in r.items() if not k.startswith("_")} for _, r in sorted(rounds.items())]


def run_agent(trainer: str, rounds: int, work: Path) -> dict:
    """One ``fedprune-agent run --trainer <trainer>``, the only device of a digits federation."""
    from fedprune.aggregator.embedded_broker import EmbeddedBroker
    from fedprune.aggregator.server import Aggregator
    from fedprune.data import load_dataset, partition
    from fedprune.edge_agent.budgets import rss_mb
    from fedprune.task import load_task

    import numpy as np

    base = load_task(EXAMPLES["digits"])
    fed = dataclasses.replace(base.federation, rounds=rounds, devices_per_round=1, min_devices=1,
                              wait_for_devices_s=120)
    pruning = dataclasses.replace(base.pruning, begin_round=1, end_round=rounds, frequency=1)
    task = dataclasses.replace(base, federation=fed, pruning=pruning)
    data = load_dataset("digits", test_fraction=base.data.test_fraction, seed=base.seed)
    shard = partition(data.y_train, DEVICES, base.data.partition, base.data.alpha, base.data.shards_per_device,
                      seed=base.seed, min_samples=base.data.min_samples)[0]
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "local.npz", x_train=data.x_train[shard], y_train=data.y_train[shard])
    env = _without(work / "without", TENSORFLOW) if trainer == "litert" else {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = work / "agent.log"
    with EmbeddedBroker() as broker, open(log, "wb") as out:
        agent = subprocess.Popen([sys.executable, "-m", "fedprune.edge_agent.cli", "run", "--broker", broker.url,
                                  "--device-id", f"bench-{trainer}", "--data", str(work / "local.npz"),
                                  "--state-dir", str(work / "state"), "--trainer", trainer, "--log-level", "INFO"],
                                 env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT)
        try:
            result = Aggregator(task, data, broker.url, work / "run", export_tflite=False).run()
            agent_rss = rss_mb(agent.pid)
            with open(f"/proc/{agent.pid}/maps") as maps:
                tensorflow_mapped = "tensorflow" in maps.read()
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
    per_round = agent_rounds(log)
    steady = per_round[1:] or per_round
    return {"trainer": trainer, "samples": int(len(shard)), "rounds": per_round,
            "reported": [r.reported for r in result.rounds],
            "median_task_to_update_s": statistics.median(r["task_to_update_s"] for r in steady),
            "median_child_s": statistics.median(r["child_s"] for r in steady),
            "max_child_peak_rss_mb": max(r["child_peak_rss_mb"] for r in per_round),
            "agent_rss_mb": None if agent_rss is None else round(agent_rss, 1),
            "tensorflow_in_agent": tensorflow_mapped}


def agents(rounds: int, work: Path) -> dict:
    out = {trainer: run_agent(trainer, rounds, work / f"agent-{trainer}") for trainer in ("keras", "litert")}
    for trainer, r in out.items():
        print(f"agent --trainer {trainer}: task to update {r['median_task_to_update_s']:.1f} s, child "
              f"{r['median_child_s']:.1f} s, child peak {r['max_child_peak_rss_mb']:.0f} MB, agent "
              f"{r['agent_rss_mb']} MB, TensorFlow in the agent: {r['tensorflow_in_agent']}", flush=True)
    out["task_to_update_ratio"] = round(out["litert"]["median_task_to_update_s"]
                                        / out["keras"]["median_task_to_update_s"], 2)
    out["litert_child_at_most_120mb"] = out["litert"]["max_child_peak_rss_mb"] <= 120
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        _, _, task_name, seed, fleet, out = sys.argv
        run_one(task_name, int(seed), fleet, Path(out))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist1d"], choices=[*EXAMPLES, "none"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fleets", nargs="+", default=list(FLEETS), choices=FLEETS)
    parser.add_argument("--agents", action="store_true", help="also the two real agents' training children")
    parser.add_argument("--agent-rounds", type=int, default=4)
    parser.add_argument("--work", type=Path, help="where the runs go (default: a temporary folder, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tf-free-") as tmp:
        work = args.work or Path(tmp)
        tasks = [t for t in args.tasks if t != "none"]
        t0 = time.monotonic()
        rows = federations(tasks, args.seeds, args.fleets, work) if tasks else []
        summary: dict = {"benchmark": "tf_free", "devices": DEVICES, "federations": rows, "compare": compare(rows)}
        if args.agents:
            summary["agents"] = agents(args.agent_rounds, work)
        summary["total_s"] = round(time.monotonic() - t0, 1)
    for task_name, entry in summary["compare"].items():
        for fleet in ("litert", "mixed"):
            if fleet in entry:
                e = entry[fleet]
                print(f"{task_name} {fleet} vs keras: final {e['final_points_vs_keras']} points (mean "
                      f"{e['mean_final_points']:+.2f}), last 5 rounds {e['last5_points_vs_keras']} (mean "
                      f"{e['mean_last5_points']:+.2f}), round training x{e['round_train_ratio']}: "
                      f"{'met' if e['within_1_point'] else 'NOT met'}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
