"""Benchmark: a thousand simulated devices on one host, then time-to-accuracy on a thin link.

1. Idle memory: RSS of a simulator process (TensorFlow and the shared trainer loaded) with 0 and
   with N connected, idle devices, plus the broker's growth; the difference per device.
2. Scale: N devices connected, K selected per round, R rounds of the digits example: peak RSS of
   the whole simulation (the devices' process, the aggregator's and the broker), each round's wall
   time split into training, encode/decode, broker transfer and aggregation, and updates lost
   (must be 0).
3. Thin link: every device's uplink at 256 kbit/s; dense float32 FedAvg against pruned 90 % int8
   (sparse from round 0); the emulated fleet time until 90 % held-out accuracy, each run at its
   fastest learning rate of a small grid, median over seeds, and the ratio.

Each phase runs in a child process of its own, so that one phase's memory does not count in the
next one's. Prints one line per phase, then one JSON line.

With ``--processes P`` (issue 17) only the scale case runs, through ``fedprune-simulate
--processes P`` on a private Mosquitto (``scale_in_processes``): peak RSS of the whole process
tree (each process's peak, summed), updates lost, each round's accounting (selected = reported +
rejected + offline + lost), its time split and the device processes' training share, and the
aggregator's peak. Beyond the data set's samples the fleet is split ``iid_with_replacement``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and tests/brokers.py for Mosquitto

from fedprune.edge_agent.budgets import peak_rss_mb, rss_mb  # noqa: E402
from fedprune.task import Task, parse_task  # noqa: E402

TARGET_ACCURACY = 0.90


def _rss_kb(pid: int | str = "self", peak: bool = False) -> int:
    """Resident memory of a process (now, or its peak since exec: VmHWM) in kB, from ``/proc``."""
    mb = (peak_rss_mb if peak else rss_mb)(pid)
    if mb is None:
        raise RuntimeError(f"cannot read the memory of process {pid} from /proc")
    return round(mb * 1024)


def _task(base: Path, **sections) -> Task:
    """The example task file with some sections' keys (or top-level values, such as seed) replaced."""
    import tomllib

    raw = tomllib.loads(base.read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return parse_task(raw, source=str(base))


def _scale_task(args) -> Task:
    # 1,437 training images over 1,000 devices: one or two each, split at random.
    return _task(args.task, data={"partition": "iid", "min_samples": 1},
                 federation={"rounds": args.rounds, "devices_per_round": args.per_round,
                             "min_devices": args.per_round, "round_timeout_s": 600, "wait_for_devices_s": 600},
                 pruning={"end_round": min(args.rounds, 10)})


# --- child phases (run as `bench_fleet.py --phase NAME`) -------------------------------------------

def phase_idle(args) -> dict:
    from fedprune.simulation.cli import _fleet

    from fedprune.converters.signing import SigningKey

    task = _scale_task(args)
    # No aggregator here: the devices only connect, so any key will do.
    fleet, _ = _fleet(task, max(args.devices, 1), range(args.devices), args.broker_url,  # loads TF, the trainer
                      SigningKey.generate().public)
    started = time.monotonic()
    fleet.start(900)
    connect_s = time.monotonic() - started
    time.sleep(5)  # settle: every subscription and retained message delivered
    out = {"devices": args.devices, "connected": fleet.connected_count(), "connect_s": connect_s,
           "rss_kb": _rss_kb()}
    fleet.stop()
    return out


def phase_devices(args) -> dict:
    """The scale phase's 1,000 devices, in a process of their own: says "ready" once connected,
    then serves rounds until the aggregator (another process) announces the end of its run."""
    from fedprune.converters.signing import VerifyKey
    from fedprune.models import architecture_of, build_model
    from fedprune.simulation.cli import _fleet

    task = _scale_task(args)
    fleet, ds = _fleet(task, args.devices, range(args.devices), args.broker_url,
                       VerifyKey.from_text(args.aggregator_key))
    # Agents that have been running a while have traced their training step (as run_simulation
    # does); the same factory gives the aggregator's architecture, digest included.
    fleet.prepare(architecture_of(build_model(task.model.factory, ds.input_shape, ds.num_classes)))
    fleet.start(900)
    print("ready", flush=True)
    try:
        fleet.wait_finished(3600)
    finally:
        fleet.stop()
    return {"fleet": fleet.stats(), "peak_rss_kb": _rss_kb(peak=True)}


def phase_scale(args) -> dict:
    """The aggregator here, the devices in a child process: each round's encode/decode and
    aggregation are then the aggregator's, not slowed by the devices' training in the same
    interpreter (as they are with everything in one process: session 2's measurement)."""
    from fedprune.aggregator.server import Aggregator
    from fedprune.converters.signing import SigningKey
    from fedprune.data import load_dataset

    task = _scale_task(args)
    key = SigningKey.generate()  # the devices' process starts first: it is told the key
    devices = subprocess.Popen(_child_command("devices", args, args.broker_url,
                                              ["--aggregator-key", key.public.text]),
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in devices.stdout:  # the devices' process says when all are connected
            if line.strip() == "ready":
                break
        else:
            raise RuntimeError("the devices' process ended before its devices connected")
        ds = load_dataset(task.data.dataset, task.data.path, task.data.test_fraction, task.seed,
                          task.data.options)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            result = Aggregator(task, ds, args.broker_url, Path(tmp) / "run", on_round=_print_round,
                                export_tflite=False, signing_key=key).run()
            wall = time.monotonic() - started
        rest = devices.communicate(timeout=300)[0]
    finally:
        if devices.poll() is None:
            devices.kill()
    child = json.loads(rest.strip().splitlines()[-1])
    aggregator_kb = _rss_kb(peak=True)
    return {"wall_s": wall, "peak_rss_kb": aggregator_kb + child["peak_rss_kb"], "aggregator_peak_rss_kb": aggregator_kb,
            "devices_peak_rss_kb": child["peak_rss_kb"], "fleet": child["fleet"],
            "rounds": [_round_figures(r) for r in result.rounds], "final_accuracy": result.final_accuracy}


def _thin_variants(args) -> dict[str, dict]:
    """The two runs of the thin-link case, as task sections to change."""
    link = {"profiles": [{"name": "thin", "uplink_kbps": args.uplink_kbps, "latency_ms": 50.0}]}
    # Each run ends once it reaches the target: the time to it is what is measured.
    fed = {"rounds": args.thin_rounds, "devices_per_round": args.thin_per_round, "min_devices": args.thin_per_round,
           "round_timeout_s": 600, "wait_for_devices_s": 600, "stop_at_accuracy": TARGET_ACCURACY}
    return {
        "dense float32 FedAvg": dict(federation=fed, simulation=link,
                                     pruning={"final_sparsity": 0.0, "initial_sparsity": 0.0},
                                     transport={"uplink_precision": "float32"}),
        # Sparse from the start, as a thin link wants: the initial model pruned to 90 % (round 0),
        # so that no update is ever dense; the first convolution (320 weights) and the output
        # layer stay dense.
        "pruned 90 % int8": dict(federation=fed, simulation=link,
                                 pruning={"schedule": "constant", "final_sparsity": 0.9, "begin_round": 0,
                                          "end_round": 0, "leave_dense": ["conv1", "logits"]},
                                 transport={"uplink_precision": "int8"}),
    }


def _median(values: list[float | None]) -> float | None:
    """Median, a run that never reached the target counting as slowest; None if most never did."""
    ordered = sorted(values, key=lambda v: float("inf") if v is None else v)
    return ordered[(len(ordered) - 1) // 2]


def phase_thin(args) -> dict:
    from fedprune.simulation.report import Run, write_report
    from fedprune.simulation.cli import run_simulation

    out = {}
    best_dirs = []
    report_dir = args.report_dir or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    for label, sections in _thin_variants(args).items():
        by_lr = {}
        for lr in args.learning_rates:
            runs = {}
            for seed in args.seeds:
                task = _task(args.task, training={"learning_rate": lr}, seed=seed, **sections)
                run_dir = report_dir / f"{label.split()[0]}-lr{lr}-seed{seed}"
                print(f"{label}, learning rate {lr}, seed {seed}:", file=sys.stderr, flush=True)
                result = run_simulation(task, args.thin_devices, run_dir, args.broker_url, export_tflite=False,
                                        on_round=_print_round)
                run = Run.load(run_dir, f"{label} (learning rate {lr}, seed {seed})")
                runs[seed] = {
                    "run_dir": str(run_dir),
                    "time_to_target_s": run.time_to_accuracy(TARGET_ACCURACY),
                    "link_time_to_target_s": run.time_to_accuracy(TARGET_ACCURACY, clock="transfer_s"),
                    "train_time_to_target_s": run.time_to_accuracy(TARGET_ACCURACY, clock="train_s"),
                    "rounds_to_target": next((r.round for r in result.rounds if r.accuracy >= TARGET_ACCURACY), None),
                    "mean_update_bytes": sum(r.bytes_up for r in result.rounds) / max(1, sum(r.received for r in result.rounds)),
                    "fleet_s_per_round": [round(r.fleet_s, 2) for r in result.rounds],
                    "accuracy_per_round": [round(r.accuracy, 4) for r in result.rounds],
                    "lost": sum(r.lost for r in result.rounds),
                }
            by_lr[lr] = {"median_time_to_target_s": _median([f["time_to_target_s"] for f in runs.values()]),
                         "seeds": {str(k): v for k, v in runs.items()}}
        reached = [lr for lr in by_lr if by_lr[lr]["median_time_to_target_s"] is not None]
        best = min(reached, key=lambda lr: by_lr[lr]["median_time_to_target_s"]) if reached else None
        if best is not None:  # the report draws the run of the first seed at the best learning rate
            best_dirs.append(by_lr[best]["seeds"][str(args.seeds[0])]["run_dir"])
        out[label] = {"best_learning_rate": best,
                      "time_to_target_s": by_lr[best]["median_time_to_target_s"] if best is not None else None,
                      "by_learning_rate": {str(lr): f for lr, f in by_lr.items()}}
    if len(best_dirs) == 2:
        dense, pruned = (Run.load(Path(d), lbl) for d, lbl in zip(best_dirs, out))
        report = write_report(best_dirs[1], label=pruned.label, compare=[dense],
                              notes=[f"bench_fleet thin link: {args.thin_devices} devices, {args.thin_per_round} per "
                                     f"round, uplink {args.uplink_kbps} kbit/s, 50 ms latency; each run at its "
                                     f"fastest learning rate of {args.learning_rates} (median over seeds "
                                     f"{args.seeds}); seed {args.seeds[0]} drawn"])
        out["report"] = str(report)
    return out


def _round_figures(r) -> dict:
    overhead = r.encode_s + r.decode_s + r.transfer_s + r.aggregate_s
    return {"round": r.round, "selected": r.selected, "reported": r.reported, "received": r.received,
            "rejected": r.rejected, "offline": r.offline, "lost": r.lost, "accuracy": r.accuracy,
            "wall_s": r.wall_s, "fleet_s": r.fleet_s, "train_s": r.train_s, "transfer_s": r.transfer_s,
            "encode_s": r.encode_s, "decode_s": r.decode_s, "aggregate_s": r.aggregate_s,
            "evaluate_s": r.evaluate_s, "overhead_of_wall": overhead / r.wall_s}


def _print_round(r) -> None:
    print(f"  round {r.round}: {r.reported}/{r.selected} reported, {r.lost} lost, accuracy {r.accuracy:.4f}, "
          f"wall {r.wall_s:.1f} s, fleet {r.fleet_s:.1f} s (train {r.train_s:.2f}, transfer {r.transfer_s:.2f}, "
          f"enc/dec {r.encode_s + r.decode_s:.3f}, aggregate {r.aggregate_s:.3f})", file=sys.stderr, flush=True)


# --- scale through `fedprune-simulate --processes P` (issue 17) -------------------------------------

def _process_tree(root: int) -> dict[int, int]:
    """``root`` and every process below it (children, Mosquitto, the device processes), each with
    its parent's pid; a parent comes before its children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = {}, [(root, 0)]
    while todo:
        pid, ppid = todo.pop()
        tree[pid] = ppid
        todo += [(child, pid) for child in children.get(pid, [])]
    return tree


class _TreeMemory:
    """Samples the resident memory of a process tree every ``interval_s``: the peak of the sum
    (``peak_sum_kb``) and each process's own peak (VmHWM, kept after it exits: ``sum_of_peaks_kb``,
    an upper bound, the figure the target is checked against)."""

    def __init__(self, root: int, interval_s: float = 0.5) -> None:
        import threading

        self.root, self.interval_s = root, interval_s
        self.peak_sum_kb = 0
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (command, VmHWM kB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total, names = 0, {}
            for pid, ppid in _process_tree(self.root).items():
                try:
                    now, peak = _rss_kb(pid), _rss_kb(pid, peak=True)
                    names[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
                except (RuntimeError, OSError):
                    continue
                name = names[pid]
                if names.get(ppid) == name:
                    # A fork that has not yet exec'd (a library running `uname -p` at start): its
                    # pages are its parent's, counted there. Seen once at a device process's
                    # 564 MB, which the sum of peaks took in full.
                    continue
                total += now
                self.peaks[pid] = (name, max(peak, self.peaks.get(pid, ("", 0))[1]))
            self.peak_sum_kb = max(self.peak_sum_kb, total)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_sum_kb": self.peak_sum_kb, "sum_of_peaks_kb": sum(p for _, p in self.peaks.values()),
                "by_process": [{"pid": pid, "command": name, "peak_rss_kb": peak}
                               for pid, (name, peak) in sorted(self.peaks.items())]}


def scale_in_processes(args) -> dict:
    """The scale case through ``fedprune-simulate --processes P`` on a private Mosquitto: N
    devices in P device processes, the aggregator in the parent. Digits has 1,437 training
    images: beyond that many devices the fleet is split ``iid_with_replacement`` (devices share
    samples: a scale test, accuracy is not the point)."""
    import tomllib

    from fedprune.data import load_dataset
    from fedprune.tomlfile import toml_text

    raw = tomllib.loads(args.task.read_text())
    base = parse_task(raw, source=str(args.task))
    samples = len(load_dataset(base.data.dataset, base.data.path, base.data.test_fraction, base.seed,
                               base.data.options).y_train)
    split = "iid" if args.devices <= samples else "iid_with_replacement"
    for section, values in {"data": {"partition": split, "min_samples": 1},
                            "federation": {"rounds": args.rounds, "devices_per_round": args.per_round,
                                           "min_devices": args.per_round, "round_timeout_s": 900,
                                           "wait_for_devices_s": 900},
                            "pruning": {"end_round": min(args.rounds, 10)}}.items():
        raw.setdefault(section, {}).update(values)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-procs-") as tmp:
        task_file = Path(tmp) / "scale.toml"
        task_file.write_text(toml_text(raw))
        run_dir = args.report_dir or Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedprune.simulation.cli", "--task", str(task_file), "--devices",
               str(args.devices), "--processes", str(args.processes), "--broker", "mosquitto", "--run-dir",
               str(run_dir), "--no-progress", "--log-level", "INFO"]
        print("running: " + " ".join(cmd), file=sys.stderr, flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        with open(Path(tmp) / "simulate.log", "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            memory = _TreeMemory(proc.pid)
            code = proc.wait()
            mem = memory.stop()
        wall = time.monotonic() - started
        output = (Path(tmp) / "simulate.log").read_text(errors="replace")
        if code != 0:
            raise RuntimeError(f"fedprune-simulate exited with status {code}:\n{output[-4000:]}")
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        fleet = json.loads((run_dir / "fleet.json").read_text())
    train_by_round = fleet.get("train_s_by_round", {})
    per_round = []
    for r in rounds:
        overhead = r["encode_s"] + r["decode_s"] + r["transfer_s"] + r["aggregate_s"]
        trained = train_by_round.get(str(r["round"]), 0.0)
        per_round.append({k: r[k] for k in ("round", "selected", "reported", "received", "rejected", "offline",
                                             "lost", "accuracy", "wall_s", "fleet_s", "train_s", "transfer_s",
                                             "encode_s", "decode_s", "aggregate_s", "evaluate_s")}
                         | {"accounted": r["selected"] == r["reported"] + r["rejected"] + r["offline"] + r["lost"],
                            "overhead_of_wall": overhead / r["wall_s"],
                            "device_training_s": trained,  # summed over the device processes
                            "training_share_of_wall": trained / r["wall_s"],
                            "training_share_of_process_time": trained / (args.processes * r["wall_s"])})
    parent = next((p for p in mem["by_process"] if p["pid"] == proc.pid), {"peak_rss_kb": 0})
    mosquitto = [p for p in mem["by_process"] if p["command"].split(" ")[0].endswith("mosquitto")]
    return {"processes": args.processes, "partition": split, "wall_s": wall, "command": " ".join(cmd[1:]),
            "peak_rss_total_kb": mem["sum_of_peaks_kb"], "peak_rss_sum_sampled_kb": mem["peak_sum_kb"],
            "aggregator_peak_rss_kb": parent["peak_rss_kb"],
            "broker_peak_rss_kb": sum(p["peak_rss_kb"] for p in mosquitto),
            "device_processes_peak_rss_kb": [p["peak_rss_kb"] for p in mem["by_process"]
                                             if "--no-aggregator" in p["command"]],
            "fleet": {k: v for k, v in fleet.items() if k != "processes"},
            "updates_lost": sum(r["lost"] for r in rounds),
            "every_round_accounted": all(r["accounted"] for r in per_round) and len(rounds) == args.rounds,
            "worst_overhead_of_wall": max(r["overhead_of_wall"] for r in per_round),
            "least_training_share_of_process_time": min(r["training_share_of_process_time"] for r in per_round),
            "rounds": per_round, "final_accuracy": rounds[-1]["accuracy"]}


PHASES = {"idle": phase_idle, "scale": phase_scale, "devices": phase_devices, "thin": phase_thin}


# --- the parent: brokers, child processes, the summary --------------------------------------------

def _child_command(phase: str, args, broker_url: str, extra: list[str] | None = None) -> list[str]:
    """This script as a child running ``phase``, with this invocation's settings."""
    cmd = [sys.executable, __file__, "--phase", phase, "--broker-url", broker_url, "--task", str(args.task),
           "--devices", str(args.devices), "--per-round", str(args.per_round), "--rounds", str(args.rounds),
           "--thin-devices", str(args.thin_devices), "--thin-per-round", str(args.thin_per_round),
           "--thin-rounds", str(args.thin_rounds), "--uplink-kbps", str(args.uplink_kbps),
           "--learning-rates", *map(str, args.learning_rates), "--seeds", *map(str, args.seeds), *(extra or [])]
    if args.report_dir:
        cmd += ["--report-dir", str(args.report_dir)]
    return cmd


def _child(phase: str, args, broker_url: str, extra: list[str] | None = None) -> dict:
    proc = subprocess.run(_child_command(phase, args, broker_url, extra), stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _broker(stack: ExitStack, kind: str) -> tuple[str, int | None]:
    """(URL, pid of a broker process or None when it runs in this process)."""
    if kind == "mosquitto":
        from brokers import MosquittoProcess

        broker = stack.enter_context(MosquittoProcess())
        return broker.url, broker.pid
    from fedprune.aggregator.embedded_broker import EmbeddedBroker

    return stack.enter_context(EmbeddedBroker()).url, None


def _broker_kb(pid: int | None, peak: bool = False) -> int:
    return _rss_kb(pid if pid is not None else "self", peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=ROOT / "examples" / "digits.toml")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--thin-devices", type=int, default=20)
    parser.add_argument("--thin-per-round", type=int, default=10)
    parser.add_argument("--thin-rounds", type=int, default=12, help="thin link: at most this many rounds")
    parser.add_argument("--uplink-kbps", type=float, default=256.0)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.005, 0.01],
                        help="thin link: each run at each of these; the fastest (median over seeds) counts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="thin link: task seeds (partitions, selections, initial model)")
    parser.add_argument("--broker", choices=["mosquitto", "embedded"], default="mosquitto")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(PHASES), help="phases to leave out")
    parser.add_argument("--report-dir", type=Path, help="keep the thin-link runs and their report here")
    parser.add_argument("--processes", type=int,
                        help="measure the scale case through `fedprune-simulate --processes P` on a private "
                             "Mosquitto instead (the other phases are skipped; issue 17's ten thousand devices)")
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--broker-url", help=argparse.SUPPRESS)
    parser.add_argument("--aggregator-key", help=argparse.SUPPRESS)  # the devices' phase: the key to trust
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return 0

    out: dict = {"broker": args.broker, "devices": args.devices, "per_round": args.per_round,
                 "rounds": args.rounds}
    if args.processes:
        scale = scale_in_processes(args)
        out = {"broker": "mosquitto (private)", "devices": args.devices, "per_round": args.per_round,
               "rounds": args.rounds, "scale": scale}
        print(f"scale in {args.processes} processes: {args.devices} devices, peak RSS "
              f"{scale['peak_rss_total_kb'] / 1024:.0f} MB in total (sum of each process's peak), "
              f"{scale['updates_lost']} updates lost, every round accounted: {scale['every_round_accounted']}, "
              f"training share of the device processes' time at least "
              f"{scale['least_training_share_of_process_time']:.1%}", flush=True)
        out["targets_met"] = {
            "total_ram_le_8GB": scale["peak_rss_total_kb"] <= 8 * 1024 * 1024,
            "no_update_lost": scale["updates_lost"] == 0,
            "every_round_accounted": scale["every_round_accounted"],
            "training_share_ge_70pct": scale["least_training_share_of_process_time"] >= 0.70,
        }
        print(json.dumps(out))
        return 0
    if "idle" not in args.skip:
        idle = {}
        for n in (0, args.devices):
            with ExitStack() as stack:
                url, pid = _broker(stack, args.broker)
                before = _broker_kb(pid)
                child = _child("idle", args, url, ["--devices", str(n)])
                idle[n] = {**child, "broker_growth_kb": _broker_kb(pid) - before}
                print(f"idle {n} devices: simulator RSS {child['rss_kb'] / 1024:.0f} MB, broker +"
                      f"{idle[n]['broker_growth_kb'] / 1024:.1f} MB, connected {child['connected']} in "
                      f"{child['connect_s']:.1f} s", flush=True)
        per_device_kb = ((idle[args.devices]["rss_kb"] + idle[args.devices]["broker_growth_kb"])
                         - (idle[0]["rss_kb"] + idle[0]["broker_growth_kb"])) / args.devices
        out["idle"] = {"zero": idle[0], "full": idle[args.devices], "per_device_kb": per_device_kb}
        print(f"memory per idle connected device: {per_device_kb:.0f} kB (simulator + broker)", flush=True)
    if "scale" not in args.skip:
        with ExitStack() as stack:
            url, pid = _broker(stack, args.broker)
            scale = _child("scale", args, url)
            broker_peak = _broker_kb(pid, peak=True) if pid is not None else 0
        scale["peak_rss_total_kb"] = scale["peak_rss_kb"] + broker_peak
        scale["broker_peak_rss_kb"] = broker_peak
        rounds = scale["rounds"]
        scale["updates_lost"] = sum(r["lost"] for r in rounds)
        scale["worst_overhead_of_wall"] = max(r["overhead_of_wall"] for r in rounds)
        out["scale"] = scale
        print(f"scale: {args.devices} devices, peak RSS {scale['peak_rss_total_kb'] / 1024:.0f} MB in total, "
              f"{scale['updates_lost']} updates lost, overhead at most {scale['worst_overhead_of_wall']:.1%} of "
              f"round wall time", flush=True)
    if "thin" not in args.skip:
        with ExitStack() as stack:
            url, _ = _broker(stack, args.broker)
            thin = _child("thin", args, url)
        dense, pruned = thin["dense float32 FedAvg"], thin["pruned 90 % int8"]
        if dense["time_to_target_s"] and pruned["time_to_target_s"]:
            thin["speedup"] = dense["time_to_target_s"] / pruned["time_to_target_s"]
        else:
            thin["speedup"] = None
        out["thin"] = thin
        print(f"thin link: to {TARGET_ACCURACY:.0%} accuracy dense {dense['time_to_target_s']} s (learning rate "
              f"{dense['best_learning_rate']}), pruned "
              f"{pruned['time_to_target_s']} s (learning rate {pruned['best_learning_rate']}), ratio {thin['speedup']}",
              flush=True)
    targets = {}
    if "idle" in out:
        targets["per_idle_device_le_1MB"] = out["idle"]["per_device_kb"] <= 1024
    if "scale" in out:
        targets["total_ram_le_4GB"] = out["scale"]["peak_rss_total_kb"] <= 4 * 1024 * 1024
        targets["no_update_lost"] = out["scale"]["updates_lost"] == 0
        targets["overhead_lt_10pct_of_round"] = out["scale"]["worst_overhead_of_wall"] < 0.10
    if "thin" in out:
        targets["pruned_10x_sooner"] = bool(out["thin"]["speedup"] and out["thin"]["speedup"] >= 10)
    out["targets_met"] = targets
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
