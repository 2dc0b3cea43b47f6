"""``fedprune-aggregator``: run a federation from a task file.

Starts an embedded MQTT broker on 127.0.0.1 unless ``--broker`` names one, waits for devices,
runs the rounds (one line each), and writes checkpoints, metrics and the sparse TFLite model into
the run folder. Ctrl-C keeps the last checkpoint; ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

from fedprune.cli_common import add_logging_args, default_run_dir, load_task_or_exit, print_round, setup_logging

log = logging.getLogger("aggregator.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedprune-aggregator", description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="task file (TOML)")
    parser.add_argument("--broker", help="MQTT broker URL, e.g. mqtt://host:1883 (default: embedded broker)")
    parser.add_argument("--port", type=int, default=1883,
                        help="port of the embedded broker (default 1883; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the embedded broker binds (default 127.0.0.1; 0.0.0.0 for a LAN)")
    parser.add_argument("--run-dir", type=Path, help="results folder (default runs/<task>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    add_logging_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.resume and args.run_dir is None:
        parser.error("--resume needs --run-dir: the folder of the run to continue")
    task = load_task_or_exit(args.task)
    run_dir = args.run_dir or default_run_dir(args.task)

    from aggregator.server import Aggregator, FederationError
    from fedprune.data import DataError, load_dataset

    try:
        dataset = load_dataset(task.data.dataset, task.data.path, task.data.test_fraction, task.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        broker_url = args.broker
        if broker_url is None:
            from aggregator.embedded_broker import EmbeddedBroker

            try:
                broker = stack.enter_context(EmbeddedBroker(args.host, args.port))
            except RuntimeError as e:
                print(f"error: {e} (another broker on that port? use --port or --broker)", file=sys.stderr)
                return 1
            broker_url = broker.url
        print(f"broker {broker_url}; waiting for devices on federation '{task.federation.id}'; "
              f"results in {run_dir}", flush=True)
        try:
            aggregator = Aggregator(task, dataset, broker_url, run_dir, resume=args.resume, on_round=print_round)
            result = aggregator.run()
        except KeyboardInterrupt:
            print(f"\ninterrupted; continue with: fedprune-aggregator --task {args.task} "
                  f"--run-dir {run_dir} --resume", file=sys.stderr)
            return 130
        except (FederationError, ConnectionError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"final accuracy {result.final_accuracy:.4f} at sparsity {result.final_sparsity:.3f}")
    for e in result.exports:
        print(f"exported {e['path']}: {e['size_bytes']:,} bytes, TFLite accuracy {e['accuracy']:.4f} "
              f"(Keras {result.final_accuracy:.4f}) via {e['runtime']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
