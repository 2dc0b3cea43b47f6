"""``fedprune-simulate``: a whole federation on one host, or a share of its devices on each of several.

Starts the embedded broker (or uses ``--broker``), the aggregator, and N simulated devices, each
with its own MQTT connection and client id, its own shard of the data set (split as the task file
says) and its own protocol state, behaving as the task's ``[simulation]`` profiles say. The devices
of one process share one TensorFlow runtime and train one after another; their connections live
on one asyncio event loop. With ``--device-ids 0-499 --no-aggregator`` a process runs only those
devices of an N-device fleet against an external broker: several such processes or hosts and one
``fedprune-aggregator`` form one federation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from typing import TYPE_CHECKING

from fedprune.converters.signing import VerifyKey
from fedprune.simulation.attacks import Attack
from fedprune.task import Task

if TYPE_CHECKING:
    from fedprune.data import Dataset

log = logging.getLogger("fedprune.simulation.cli")


def _fleet(task: Task, num_devices: int, device_ids: range | None, broker_url: str, aggregator_key: VerifyKey,
           attack: Attack | None = None, ds: Dataset | None = None):
    """The (not yet started) fleet of this process, trusting ``aggregator_key``, and the data set
    it was split from (``ds``, loaded as the task says when None). With ``attack``, that fraction
    of the whole fleet is hostile (``fedprune.simulation.attacks``)."""
    from fedprune.data import load_dataset, partition
    from fedprune.simulation.fleet import Fleet, device_id

    ds = ds or load_dataset(task.data.dataset, task.data.path, task.data.test_fraction, task.seed, task.data.options)
    shards = partition(ds.y_train, num_devices, task.data.partition, task.data.alpha,
                       task.data.shards_per_device, seed=task.seed, min_samples=task.data.min_samples)
    ids = device_ids if device_ids is not None else range(num_devices)
    trainers, trainable_files, runtime = _trainers(task)
    hostile = frozenset(attack.hostile_devices(num_devices, task.seed)) if attack else frozenset()
    if hostile:
        log.warning("hostile devices (%s x%g): %s", attack.kind, attack.scale,
                    ", ".join(device_id(i) for i in sorted(hostile)))
    return Fleet(task, ds.x_train, ds.y_train, shards, ids, broker_url, trainers, aggregator_key=aggregator_key,
                 hostile=hostile, hostile_trainers={k: attack.wrap(t) for k, t in trainers.items()} if attack else None,
                 trainable_files=trainable_files, runtime=runtime), ds


def _trainers(task: Task):
    """One trainer per kind the task's profiles name (shared by that kind's devices), the store of
    trainable files the TensorFlow-free devices receive, and their TFLite runtime."""
    from fedprune.edge_agent.capabilities import tflite_runtime
    from fedprune.edge_agent.trainable_files import TrainableFiles

    kinds = {p.trainer for p in task.simulation.profiles}
    trainers, files, runtime = {}, None, ""
    if "keras" in kinds:
        from fedprune.edge_agent.trainer import KerasTrainer

        trainers["keras"] = KerasTrainer()
    if "litert" in kinds:
        from fedprune.edge_agent.litert_trainer import TrainableFileTrainer

        files, runtime = TrainableFiles(), tflite_runtime()
        trainers["litert"] = TrainableFileTrainer(files, seed=task.seed)
    return trainers, files, runtime


def run_simulation(
    task: Task,
    num_devices: int,
    run_dir: Path,
    broker_url: str | None = None,
    on_round: Callable | None = None,
    export_tflite: bool = True,
    attack: Attack | None = None,
    *,
    on_update: Callable | None = None,
    device_ids: range | None = None,
    connect_timeout_s: float = 600.0,
    resume: bool = False,
    status_at: tuple[str, int] | None = None,
    aggregator_workers: int = 0,
):
    """Run a simulated federation and return the aggregator's ``RunResult``.

    ``broker_url``: a running broker's URL, or None (or ``"embedded"``) for the embedded broker,
    or ``"mosquitto"`` for a private Mosquitto started here (``simulation.private_broker``).
    ``device_ids``: the devices of the ``num_devices`` fleet simulated here (default all; an empty
    range: none, the aggregator only); the rest are expected to join from other processes on the
    same broker (trusting the key in ``<run_dir>/aggregator.pub``). The fleet's counters go to
    ``fleet.json`` in the run folder (not written when no device runs here).
    ``resume``: continue the run in ``run_dir`` from its last checkpoint. ``status_at``: (host,
    port) of a live status page (its address is printed). ``aggregator_workers``: the aggregator's
    aggregation workers (``fedprune-aggregator --workers``; they need Mosquitto, not the embedded broker).
    """
    from fedprune.aggregator.server import Aggregator
    from fedprune.aggregator.status_page import StatusPage
    from fedprune.data import load_dataset
    from fedprune.simulation.fleet import online_by_profile

    if aggregator_workers and broker_url in (None, "embedded"):
        raise ValueError("aggregation workers need a broker with shared subscriptions ($share), such as Mosquitto 2; "
                         "the embedded broker (amqtt) has none: use broker_url='mosquitto' or a Mosquitto URL")
    with ExitStack() as stack:
        broker_url = _start_broker(stack, broker_url)
        ds = load_dataset(task.data.dataset, task.data.path, task.data.test_fraction, task.seed, task.data.options)
        # The devices are given the aggregator's key in-process, as a real device gets it in its
        # connection file.
        aggregator = Aggregator(task, ds, broker_url, run_dir, on_round=on_round, on_update=on_update,
                                export_tflite=export_tflite, resume=resume, workers=aggregator_workers)
        # Round 1 waits for every device that connects at all: not for those offline by their
        # profile (`availability`), which would hold it until federation.wait_for_devices_s.
        aggregator.fleet_size = online_by_profile(task.simulation, num_devices, task.seed)
        if status_at is not None:
            page = stack.enter_context(StatusPage(aggregator.status.snapshot, *status_at))
            print(f"status page: {page.url}", flush=True)
        if device_ids is not None and len(device_ids) == 0:  # every device runs in other processes
            return aggregator.run()
        fleet, _ = _fleet(task, num_devices, device_ids, broker_url, aggregator.verify_key, attack, ds)
        stack.callback(fleet.stop)
        fleet.prepare(aggregator.architecture)
        fleet.start(connect_timeout_s)
        result = aggregator.run()
        stats = fleet.stats()
    (Path(run_dir) / "fleet.json").write_text(json.dumps(stats, indent=2))
    return result


def _start_broker(stack: ExitStack, broker_url: str | None) -> str:
    """The URL of the broker to use: ``broker_url`` itself, or one started here and stopped with
    ``stack`` (None or ``"embedded"``: the embedded broker; ``"mosquitto"``: a private Mosquitto)."""
    if broker_url == "mosquitto":
        from fedprune.simulation.private_broker import PrivateMosquitto

        mosquitto = stack.enter_context(PrivateMosquitto())
        log.info("private Mosquitto on %s", mosquitto.url)
        return mosquitto.url
    if broker_url in (None, "embedded"):
        from fedprune.aggregator.embedded_broker import EmbeddedBroker

        broker = stack.enter_context(EmbeddedBroker())
        log.info("embedded MQTT broker on %s", broker.url)
        return broker.url
    return broker_url


def _broker_line(choice, url: str) -> str:
    """The line saying which broker the simulation uses, where, and why."""
    if choice.kind == "mosquitto":
        from fedprune.simulation.private_broker import mosquitto_executable

        return f"broker: a private Mosquitto ({mosquitto_executable()}) on {url}, started for this run; {choice.why}"
    if choice.kind == "embedded":
        return f"broker: the embedded broker (amqtt, MQTT 3.1.1) on {url}; {choice.why}"
    return f"broker: {url} ({choice.why})"


def run_devices(task: Task, num_devices: int, device_ids: range, broker_url: str, aggregator_key: VerifyKey,
                connect_timeout_s: float = 600.0, timeout_s: float | None = None,
                on_connected: Callable[[int], None] | None = None) -> dict:
    """Run devices ``device_ids`` of the fleet (no aggregator), trusting ``aggregator_key``, until
    the aggregator announces the end of its run, ``timeout_s`` passes, or Ctrl-C; returns the
    fleet's counters. ``on_connected(n)``: once the ``n`` devices online by their profiles are."""
    fleet, _ = _fleet(task, num_devices, device_ids, broker_url, aggregator_key)
    try:
        fleet.start(connect_timeout_s)
        log.info("%d devices (%s) connected to %s; waiting for the aggregator's rounds",
                 fleet.online_count, device_ids, broker_url)
        if on_connected is not None:
            on_connected(fleet.online_count)
        fleet.wait_finished(timeout_s)
    finally:
        fleet.stop()
    return fleet.stats()


def _device_processes(args: argparse.Namespace, task: Task, ranges: list[range], run_dir: Path, broker_url: str):
    """The (not yet started) device processes of ``--processes``: each ``--no-aggregator`` on
    ``broker_url``, trusting the run's key (made now in ``run_dir`` if it is new)."""
    from fedprune.aggregator.channel import run_signing_key
    from fedprune.simulation.processes import CONNECTED_MARKER, DeviceProcesses, child_environment, device_command

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    key = run_signing_key(Path(run_dir))
    extra = ["--log-level", args.log_level] + (["--rounds", str(args.rounds)] if args.rounds is not None else [])
    command = device_command(str(args.task), args.devices, broker_url, key.public.text, extra)
    print(f"{args.devices} devices in {len(ranges)} processes ("
          + ", ".join(f"{r.start}-{r.stop - 1}" for r in ranges) + f"); their logs: {run_dir}/devices-<k>.log",
          flush=True)
    def connected(index: int, line: str, ready: int) -> None:
        print(f"device process {index}: {line.removeprefix(CONNECTED_MARKER).strip()} ({ready} of {len(ranges)} "
              "processes ready)", flush=True)

    return DeviceProcesses(command, ranges, Path(run_dir), env=child_environment(len(ranges)), on_connected=connected)


def _stop_on_sigterm(stack: ExitStack) -> None:
    """Until ``stack`` closes, ``kill`` (SIGTERM) stops the run as Ctrl-C does: the device
    processes and the broker stopped first, not left behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def terminated(signum, frame):
        raise KeyboardInterrupt

    stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, terminated))


def _merged_counters(counters: list[dict], run_dir: Path) -> dict:
    """The device processes' counters as one, written to ``fleet.json`` as a one-process run's."""
    from fedprune.simulation.processes import merge_counters

    merged = merge_counters(counters)
    (Path(run_dir) / "fleet.json").write_text(json.dumps(merged, indent=2))
    return merged


def main(argv: list[str] | None = None) -> int:
    from fedprune.aggregator.run_folder import interrupted, refusal
    from fedprune.aggregator.strategies import strategy_for_task
    from fedprune.cli_common import add_logging_args, default_run_dir, load_task_or_exit, print_outcome, print_round
    from fedprune.cli_common import setup_logging, take_sigint_as_ctrl_c
    from fedprune.simulation.progress import log_console
    from fedprune.quiet_start import request_quiet_start
    from fedprune.simulation.fleet import parse_id_range

    request_quiet_start()  # before anything loads TensorFlow
    take_sigint_as_ctrl_c()  # the watch over the device processes stops the run with SIGINT

    parser = argparse.ArgumentParser(prog="fedprune-simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="task file (TOML)")
    parser.add_argument("--devices", type=int, default=20, help="devices in the whole fleet (default 20)")
    parser.add_argument("--device-ids", help="the devices this process runs, e.g. 0-499 (default: all)")
    parser.add_argument("--processes", type=int, default=1, metavar="P",
                        help="run the devices in P processes of their own (contiguous ranges of device ids, "
                             "one TensorFlow runtime each, about 700 MB), the aggregator in this one; for "
                             "thousands of devices (default 1: devices and aggregator in this process)")
    parser.add_argument("--no-aggregator", action="store_true",
                        help="run devices only, against --broker, until the aggregator finishes its run")
    parser.add_argument("--aggregator-workers", type=int, default=0, metavar="N",
                        help="the aggregator's aggregation worker processes (fedprune-aggregator --workers N): "
                             "need Mosquitto (--broker auto then starts a private one) and a strategy that streams")
    parser.add_argument("--broker", default="auto",
                        help="auto (default: the embedded broker for up to 200 devices, a private Mosquitto "
                             "started here for more where one is installed), embedded, mosquitto, or the URL "
                             "of a running broker (mqtt://host:port)")
    parser.add_argument("--rounds", type=int,
                        help="run this many rounds instead of the task's federation.rounds (e.g. 1 for a quick check)")
    parser.add_argument("--aggregator-key", metavar="KEY",
                        help="with --no-aggregator: the aggregator's public key (ed25519:..., or its aggregator.pub); "
                             "the devices accept only messages it signed")
    parser.add_argument("--run-dir", type=Path, help="where to write results (default runs/<task>-<time>)")
    parser.add_argument("--attack", choices=["sign_flip"],
                        help="make some devices hostile: sign_flip sends -scale x the trained delta")
    parser.add_argument("--attack-fraction", type=float, default=0.2, help="fraction of hostile devices (default 0.2)")
    parser.add_argument("--attack-scale", type=float, default=10.0, help="sign_flip scale (default 10)")
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="other run folders (e.g. dense FedAvg) to draw beside this run in the report")
    parser.add_argument("--no-progress", action="store_true", help="plain lines instead of progress bars")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    parser.add_argument("--status-port", type=int,
                        help="serve a live status page (and status.json) on this port (0 picks a free one)")
    parser.add_argument("--status-host", default="127.0.0.1",
                        help="address the status page binds (default 127.0.0.1; read-only, no secrets)")
    add_logging_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.devices < 1:
        parser.error("--devices must be >= 1")
    try:
        attack = Attack(args.attack, args.attack_fraction, args.attack_scale) if args.attack else None
        device_ids = parse_id_range(args.device_ids, args.devices) if args.device_ids else None
    except ValueError as e:
        parser.error(str(e))
    missing = [str(p) for p in args.compare if not (p / "metrics.jsonl").is_file()]
    if missing:
        parser.error(f"--compare: no metrics.jsonl in {', '.join(missing)}; give run folders of earlier runs")
    if args.no_aggregator and not ("://" in args.broker and args.aggregator_key):
        parser.error("--no-aggregator needs --broker URL and --aggregator-key: the broker that fedprune-aggregator "
                     "and the other hosts use, and the key the aggregator prints at start (its aggregator.pub)")
    from fedprune.simulation.private_broker import EMBEDDED_MAX_DEVICES, choose_broker

    workers_pick_mosquitto = bool(args.aggregator_workers) and args.broker == "auto"
    if workers_pick_mosquitto:
        args.broker = "mosquitto"  # workers need shared subscriptions, which the embedded broker has not
    try:
        choice = choose_broker(args.broker, len(device_ids) if device_ids else args.devices)
    except ValueError as e:
        parser.error(str(e))
    if workers_pick_mosquitto:
        choice.why = "aggregation workers need shared subscriptions, which the embedded broker has not"
    if args.aggregator_workers and (choice.kind == "embedded" or args.no_aggregator):
        parser.error("--aggregator-workers needs the aggregator here and a broker with shared subscriptions "
                     "($share), such as Mosquitto 2: the embedded broker (amqtt) has none; use --broker mosquitto "
                     "or --broker mqtt://HOST:PORT")
    ranges = None
    if args.processes != 1:
        from fedprune.simulation.processes import split_ranges

        if args.no_aggregator or args.device_ids or args.attack:
            parser.error("--processes runs the whole fleet and the aggregator from one command: leave out "
                         "--no-aggregator, --device-ids and --attack (per-host ranges: run --device-ids ranges "
                         "yourself)")
        try:
            ranges = split_ranges(args.devices, args.processes)
        except ValueError as e:
            parser.error(str(e))
        if choice.kind == "embedded" and args.devices > EMBEDDED_MAX_DEVICES:
            parser.error(f"--processes {args.processes} with {args.devices} devices: the embedded broker serves up "
                         f"to {EMBEDDED_MAX_DEVICES} devices; install Mosquitto (apt-get install mosquitto; --broker "
                         "auto then starts a private one) or pass --broker mqtt://HOST:PORT")
    if args.resume and args.run_dir is None:
        parser.error("--resume needs --run-dir: the folder of the run to continue")
    task = load_task_or_exit(args.task, check=strategy_for_task)
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        from dataclasses import replace

        task = replace(task, federation=replace(task.federation, rounds=args.rounds))

    if args.no_aggregator:
        ids = device_ids or range(args.devices)
        print(f"running devices {ids.start}-{ids.stop - 1} of {args.devices} against {args.broker}", flush=True)
        from fedprune.aggregator_key import KeyFileError, parse_aggregator_key

        try:
            key = parse_aggregator_key(args.aggregator_key)
        except KeyFileError as e:
            parser.error(f"--aggregator-key: {e}")
        from fedprune.simulation.processes import BASE_OPEN_FILES, CONNECTED_MARKER, raise_open_files_limit

        def connected(n: int) -> None:  # the line --processes waits for in this process's log
            print(f"{CONNECTED_MARKER} {n:,} of devices {ids.start}-{ids.stop - 1} online; waiting for the "
                  "aggregator's rounds", flush=True)

        try:
            raise_open_files_limit(len(ids) + BASE_OPEN_FILES)  # one descriptor per device connection
            stats = run_devices(task, args.devices, ids, args.broker, key, on_connected=connected)
        except KeyboardInterrupt:
            return 130
        except (ConnectionError, ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        from fedprune.edge_agent.budgets import peak_rss_mb

        peak = peak_rss_mb()  # for --processes: the simulation's memory is the sum over its processes
        print(json.dumps({**stats, "peak_rss_kb": round(peak * 1024) if peak is not None else 0}))
        return 0

    run_dir = args.run_dir or default_run_dir(args.task)
    stop = refusal(run_dir, args.resume)  # another run's folder, a finished run
    if stop is not None:
        print(stop[1], file=sys.stderr if stop[0] else sys.stdout)
        return stop[0]
    print(f"simulating {args.devices} devices; results in {run_dir}", flush=True)
    start = time.monotonic()
    console = log_console()  # tables and lines whole in a log file, not cut to 80 columns
    processes = None
    with ExitStack() as stack:
        try:
            from fedprune.simulation.processes import BASE_OPEN_FILES, raise_open_files_limit

            # One descriptor per device connection: in a broker started here (all of them), and in
            # the devices' processes (this one's, or the children's, which inherit the limit).
            here = 0 if ranges is not None else (len(device_ids) if device_ids else args.devices)
            raise_open_files_limit(BASE_OPEN_FILES + (here if choice.kind == "url" else args.devices))
            broker = _start_broker(stack, choice.url if choice.kind == "url" else choice.kind)
        except (RuntimeError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(_broker_line(choice, broker), flush=True)
        if ranges is not None:
            _stop_on_sigterm(stack)
            processes = stack.enter_context(_device_processes(args, task, ranges, run_dir, broker))
            device_ids = range(0)  # the aggregator only, here
        callbacks: dict = {"on_round": print_round}
        if not args.no_progress:
            from fedprune.simulation.progress import FederationProgress

            progress = stack.enter_context(FederationProgress(task.federation.rounds, console))
            callbacks = {"on_round": progress.on_round, "on_update": progress.on_update}
        try:
            result = run_simulation(task, args.devices, run_dir, broker, device_ids=device_ids, attack=attack,
                                    resume=args.resume, status_at=None if args.status_port is None
                                    else (args.status_host, args.status_port),
                                    aggregator_workers=args.aggregator_workers, **callbacks)
            if processes is not None:
                fleet = _merged_counters(processes.finish(), run_dir)
        except KeyboardInterrupt:
            if processes is not None and processes.failure is not None:
                print(f"\nerror: {processes.failure.message()}\nthe simulation was stopped; the run folder "
                      f"{run_dir} holds the rounds completed so far", file=sys.stderr)
                return 1
            print("\n" + interrupted("fedprune-simulate", list(sys.argv[1:] if argv is None else argv), run_dir),
                  file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - a CLI reports, the traceback is in the log at debug
            log.debug("simulation failed", exc_info=True)
            print(f"error: {e}", file=sys.stderr)
            return 1
    from fedprune.simulation.report import Run, write_report

    notes = [f"task `{task.source}`; {args.devices} devices, data `{task.data.dataset}` split `{task.data.partition}`",
             f"simulated wall time {time.monotonic() - start:.1f} s"]
    if processes is not None:
        notes.append(f"devices in {len(ranges)} processes (logs `devices-<k>.log`): {fleet['devices']} devices, "
                     f"{fleet['online']} online, {fleet['updates_sent']} updates sent, {fleet['send_errors']} send "
                     f"errors, {fleet['dropouts']} dropouts (`fleet.json`)")
    if task.data.partition == "iid_with_replacement":
        from fedprune.data import SHARED_SAMPLES_NOTE

        notes.append(SHARED_SAMPLES_NOTE)
    report = write_report(run_dir, notes=notes, compare=[Run.load(p) for p in args.compare])
    if not args.no_progress:
        from fedprune.simulation.progress import summary_table

        console.print(summary_table(result.rounds))
    print_outcome(result)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
