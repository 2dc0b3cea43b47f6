"""``fedprune-aggregator``: run a federation from a task file.

Starts an embedded MQTT broker on 127.0.0.1 unless ``--broker`` or ``--connection`` names one,
waits for devices, runs the rounds (one line each), and writes checkpoints, metrics and the sparse
TFLite model into the run folder. Ctrl-C keeps the last checkpoint; ``--resume`` continues from it.

``fedprune-aggregator init-broker ...`` writes a TLS broker set-up with per-device credentials
and access control instead (``fedprune.aggregator.broker_setup``; ``init-broker --help``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedprune.aggregator.run_folder import refusal
from fedprune.aggregator.status_page import StatusPage
from fedprune.aggregator.strategies import strategy_for_task
from fedprune.cli_common import add_logging_args, default_run_dir, load_task_or_exit, print_outcome, print_round
from fedprune.cli_common import setup_logging, take_sigint_as_ctrl_c
from fedprune.quiet_start import request_quiet_start
from fedprune.transport import parse_broker_url
from fedprune.wait_notices import WaitNotices

if TYPE_CHECKING:
    from fedprune.aggregator.broker_setup import BrokerFolder
    from fedprune.converters.signing import SigningKey
    from fedprune.data import Dataset
    from fedprune.task import Task

log = logging.getLogger("fedprune.aggregator.cli")


def main(argv: list[str] | None = None) -> int:
    request_quiet_start()  # before anything loads TensorFlow
    take_sigint_as_ctrl_c()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["init-broker"]:
        from fedprune.aggregator.broker_setup import main as init_broker_main

        return init_broker_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.resume and args.run_dir is None:
        parser.error("--resume needs --run-dir: the folder of the run to continue")
    if sum(x is not None for x in (args.broker, args.connection, args.broker_dir)) > 1:
        parser.error("give at most one of --broker, --connection and --broker-dir")
    task = load_task_or_exit(args.task, check=strategy_for_task)
    if args.workers:
        cannot = _workers_refusal(args, task)
        if cannot:
            print(f"error: {cannot}", file=sys.stderr)
            return 2
    run_dir = args.run_dir or default_run_dir(args.task)
    stop = refusal(run_dir, args.resume)  # before anything is started: a finished run, another run's folder
    if stop is not None:
        print(stop[1], file=sys.stderr if stop[0] else sys.stdout)
        return stop[0]
    try:
        broker_url, folder, key_file = _broker_choice(args, task.federation.id)
        signing_key = _signing_key(args.signing_key or key_file or run_dir / "aggregator.key")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from fedprune.data import DataError, load_dataset

    try:
        dataset = load_dataset(task.data.dataset, task.data.path, task.data.test_fraction, task.seed, task.data.options)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        shown_url = parse_broker_url(broker_url).url if broker_url else None
        if broker_url is None or folder is not None:
            try:
                shown_url, broker_url = _embedded_broker(stack, args, broker_url, folder)
            except RuntimeError as e:
                print(f"error: {e} (another broker on that port? use --port or --broker)", file=sys.stderr)
                return 1
        print(f"broker {shown_url}; waiting for devices on federation '{task.federation.id}' (agents: "
              f"--federation {task.federation.id}); results in {run_dir}", flush=True)
        print(f"messages to devices are signed: devices trust them with --aggregator-key {signing_key.public.text}",
              flush=True)
        return _run(args, argv, task, dataset, broker_url, run_dir, signing_key)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprune-aggregator", description=__doc__.splitlines()[0],
                                     epilog="To write a secured broker set-up: fedprune-aggregator init-broker --help")
    parser.add_argument("--task", required=True, help="task file (TOML)")
    parser.add_argument("--broker", help="MQTT broker URL, e.g. mqtt://host:1883 (default: embedded broker)")
    parser.add_argument("--connection", type=Path,
                        help="connection file (aggregator.toml from init-broker): broker URL, credentials and CA")
    parser.add_argument("--broker-dir", type=Path,
                        help="folder written by init-broker: the embedded broker enforces its TLS, logins and "
                             "access policy on --port (default: the folder's port), and the aggregator logs in "
                             "with its aggregator.toml")
    parser.add_argument("--port", type=int, default=None,
                        help="port of the embedded broker (default 1883, or the --broker-dir's; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the embedded broker binds (default 127.0.0.1; 0.0.0.0 for a LAN)")
    parser.add_argument("--signing-key", type=Path,
                        help="the aggregator's Ed25519 key, which signs every message to devices (PEM; made, mode "
                             "600, with its .pub beside it, if missing). Default: the one a --connection or "
                             "--broker-dir names, else <run-dir>/aggregator.key")
    parser.add_argument("--run-dir", type=Path, help="results folder (default runs/<task>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    parser.add_argument("--status-port", type=int,
                        help="serve a live status page (and status.json) on this port (0 picks a free one)")
    parser.add_argument("--status-host", default="127.0.0.1",
                        help="address the status page binds (default 127.0.0.1; read-only, no secrets)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="aggregation worker processes that take, check, decode and sum the updates (through a "
                             "shared subscription: needs Mosquitto 2 or another broker with $share, given with "
                             "--broker or --connection, and a strategy that streams: fedavg, dp_fedavg, "
                             "device_mask_averaging); default 0: the aggregator does it all")
    add_logging_args(parser, default="INFO")
    return parser


def _workers_refusal(args: argparse.Namespace, task: Task) -> str | None:
    """Why ``--workers`` cannot run here (None: it can)."""
    from fedprune.aggregator.workers import workers_refusal

    if args.workers < 0:
        return f"--workers must be 0 or more, got {args.workers}"
    if args.broker is None and args.connection is None:
        return ("--workers needs a broker with MQTT shared subscriptions ($share), such as Mosquitto 2: give "
                "--broker mqtt://HOST:1883 or --connection; the embedded broker (amqtt, MQTT 3.1.1) has none")
    return workers_refusal(strategy_for_task(task), task)


def _embedded_broker(stack: ExitStack, args: argparse.Namespace, broker_url: str | None,
                     folder: BrokerFolder | None) -> tuple[str, str]:
    """Start the embedded broker (entered on ``stack``); its URL to show, and the one the
    aggregator connects to (for --broker-dir, its own login to the broker's actual port).
    RuntimeError when it cannot start."""
    from fedprune.aggregator.embedded_broker import EmbeddedBroker

    port = args.port if args.port is not None else (folder.port if folder else 1883)
    broker = stack.enter_context(EmbeddedBroker(args.host, port, folder.security() if folder else None))
    if folder is None:
        return broker.url, broker.url
    a = parse_broker_url(broker_url)
    return broker.url, replace(a, host="127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host,
                               port=broker.port).full_url()


def _signing_key(path: Path) -> SigningKey:
    """The key in ``path``, made there if there is none; ValueError (KeyFileError) if unusable."""
    from fedprune.aggregator_key import load_or_create_signing_key, public_key_file

    key, created = load_or_create_signing_key(path)
    if created:
        print(f"wrote a new signing key to {path} (its public key to {public_key_file(path)})", flush=True)
    return key


def _run(args: argparse.Namespace, argv: list[str], task: Task, dataset: Dataset, broker_url: str | None,
         run_dir: Path, signing_key: SigningKey) -> int:
    """Run the federation and print its results; the exit status. While it runs, every quiet
    stretch of 10 s gets a line saying what it waits for (``WaitNotices``)."""
    from fedprune.aggregator.run_folder import interrupted
    from fedprune.aggregator.server import Aggregator, FederationError
    from fedprune.aggregator.update_buffers import UpdateMemoryError

    built: list[Aggregator] = []
    starting = "loading TensorFlow and building the model"
    try:
        with ExitStack() as stack:
            stack.enter_context(WaitNotices(lambda: built[0].status.describe() if built else starting, log))
            built.append(Aggregator(task, dataset, broker_url, run_dir, resume=args.resume, on_round=print_round,
                                    signing_key=signing_key, workers=args.workers))
            if args.status_port is not None:
                page = stack.enter_context(StatusPage(built[0].status.snapshot, args.status_host, args.status_port))
                print(f"status page: {page.url}", flush=True)
            result = built[0].run()
    except KeyboardInterrupt:
        print("\n" + interrupted("fedprune-aggregator", argv, run_dir), file=sys.stderr)
        return 130
    except (FederationError, ConnectionError, OSError, ValueError, UpdateMemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_outcome(result)
    return 0


def _broker_choice(args: argparse.Namespace, federation: str) -> tuple[str | None, BrokerFolder | None, Path | None]:
    """The broker URL with credentials (None: a plain embedded broker), for --broker-dir the
    set-up the embedded broker enforces, and the signing key a connection file names. Raises
    ValueError saying what is wrong."""
    from fedprune.aggregator.broker_setup import load_broker_folder
    from fedprune.connection import load_connection

    if args.broker is not None:
        parse_broker_url(args.broker)
        return args.broker, None, None
    if args.connection is None and args.broker_dir is None:
        return None, None, None
    folder = None
    path = args.connection
    if args.broker_dir is not None:
        folder = load_broker_folder(args.broker_dir)
        path = folder.aggregator_connection
    connection = load_connection(path)
    if connection.role != "aggregator":
        raise ValueError(f"{path} is a {connection.role}'s connection file; the aggregator needs aggregator.toml")
    if connection.federation != federation:
        raise ValueError(f"{path} is for federation {connection.federation!r}, the task file runs {federation!r}; "
                         "set [federation] id in the task file to match")
    return connection.broker.full_url(), folder, Path(connection.signing_key)


if __name__ == "__main__":
    sys.exit(main())
