"""``fedprune-simulate``: a whole federation on one host.

Starts the embedded broker (or uses ``--broker``), the aggregator, and N agents, each with its own
MQTT client and its own shard of the data set (split as the task file says), then writes a report.
The agents share one TensorFlow runtime and train one after another.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from fedprune.attacks import Attack
from fedprune.task import Task

log = logging.getLogger("fedprune.simulate")


def run_simulation(
    task: Task,
    num_devices: int,
    run_dir: Path,
    broker_url: str | None = None,
    on_round=None,
    export_tflite: bool = True,
    attack: Attack | None = None,
):
    """Run a simulated federation and return the aggregator's ``RunResult``.

    With ``attack``, that fraction of the devices is hostile (``fedprune.attacks``).
    """
    from aggregator.server import Aggregator
    from edge_agent.agent import EdgeAgent
    from edge_agent.trainer import KerasTrainer
    from fedprune.data import load_dataset, partition

    ds = load_dataset(task.data.dataset, task.data.path, task.data.test_fraction, task.seed)
    shards = partition(ds.y_train, num_devices, task.data.partition, task.data.alpha,
                       task.data.shards_per_device, seed=task.seed)
    with ExitStack() as stack:
        if broker_url is None:
            from aggregator.embedded_broker import EmbeddedBroker

            broker = stack.enter_context(EmbeddedBroker())
            broker_url = broker.url
            log.info("embedded MQTT broker on %s", broker_url)
        aggregator = Aggregator(task, ds, broker_url, run_dir, on_round=on_round, export_tflite=export_tflite)
        trainer = KerasTrainer()
        hostile = attack.hostile_devices(num_devices, task.seed) if attack else set()
        if hostile:
            log.warning("hostile devices (%s x%g): %s", attack.kind, attack.scale,
                        ", ".join(f"sim-{i:03d}" for i in sorted(hostile)))
        for i, idx in enumerate(shards):
            agent = EdgeAgent(broker_url, f"sim-{i:03d}", ds.x_train[idx], ds.y_train[idx],
                              attack.wrap(trainer) if i in hostile else trainer,
                              federation=task.federation.id,
                              max_payload_bytes=task.transport.max_payload_bytes,
                              max_message_bytes=task.transport.max_message_bytes,
                              seed=task.seed * 100_003 + i)
            agent.start()
            stack.callback(agent.stop)
        return aggregator.run()


def write_report(result, task: Task, num_devices: int, wall_s: float) -> Path:
    lines = [
        f"# fedprune simulation report",
        "",
        f"- task: `{task.source}`; {num_devices} devices, data `{task.data.dataset}` split "
        f"`{task.data.partition}`" + (f" (alpha {task.data.alpha})" if task.data.partition == "dirichlet" else ""),
        f"- final held-out accuracy (Keras): **{result.final_accuracy:.4f}** at global sparsity "
        f"**{result.final_sparsity:.3f}**",
        f"- wall time: {wall_s:.1f} s",
        "",
        "| round | reported | accuracy | sparsity | bytes down | bytes up | bytes up per update | rejected |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rounds:
        per = r.bytes_up // max(r.reported, 1)
        lines.append(f"| {r.round} | {r.reported}/{r.selected} | {r.accuracy:.4f} | {r.sparsity:.3f} | "
                     f"{r.bytes_down:,} | {r.bytes_up:,} | {per:,} | {r.rejected} |")
    if result.exports:
        lines += ["", "| exported model | bytes | TFLite accuracy | runtime |", "|---|---:|---:|---|"]
        for e in result.exports:
            lines.append(f"| {Path(e['path']).name} | {e['size_bytes']:,} | {e['accuracy']:.4f} | {e['runtime']} |")
    path = result.run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    from fedprune.cli_common import add_logging_args, default_run_dir, load_task_or_exit, print_round, setup_logging

    parser = argparse.ArgumentParser(prog="fedprune-simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="task file (TOML)")
    parser.add_argument("--devices", type=int, default=20, help="number of simulated devices (default 20)")
    parser.add_argument("--broker", help="use this broker (mqtt://host:port) instead of the embedded one")
    parser.add_argument("--run-dir", type=Path, help="where to write results (default runs/<task>-<time>)")
    parser.add_argument("--attack", choices=["sign_flip"],
                        help="make some devices hostile: sign_flip sends -scale x the trained delta")
    parser.add_argument("--attack-fraction", type=float, default=0.2, help="fraction of hostile devices (default 0.2)")
    parser.add_argument("--attack-scale", type=float, default=10.0, help="sign_flip scale (default 10)")
    add_logging_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.devices < 1:
        parser.error("--devices must be >= 1")
    try:
        attack = Attack(args.attack, args.attack_fraction, args.attack_scale) if args.attack else None
    except ValueError as e:
        parser.error(str(e))
    task = load_task_or_exit(args.task)
    run_dir = args.run_dir or default_run_dir(args.task)
    print(f"simulating {args.devices} devices; results in {run_dir}", flush=True)
    start = time.monotonic()
    try:
        result = run_simulation(task, args.devices, run_dir, args.broker, on_round=print_round, attack=attack)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last completed round is checkpointed in {run_dir}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a CLI reports, the traceback is in the log at debug
        log.debug("simulation failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = write_report(result, task, args.devices, time.monotonic() - start)
    for e in result.exports:
        print(f"exported {e['path']}: {e['size_bytes']:,} bytes, TFLite accuracy {e['accuracy']:.4f} "
              f"(Keras {result.final_accuracy:.4f}) via {e['runtime']}")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
