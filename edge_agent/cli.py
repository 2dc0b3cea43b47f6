"""``fedprune-agent``: join a federation from a device, and run its model.

    fedprune-agent [run] --config /etc/fedprune/agent.toml      # or --broker, --device-id, --data
    fedprune-agent predict --config /etc/fedprune/agent.toml --input samples.csv
    fedprune-agent model status|rollback --config /etc/fedprune/agent.toml

``run`` connects to the broker, announces the device and what it trains with, trains when
selected (in a child process that exits after each round, within the configured budgets: Keras
where TensorFlow is installed, else a trainable TFLite file in LiteRT), sends its update, installs
the global model as a sparse TFLite file (each round's, exported on a Keras device, and the final
one the aggregator publishes), and reconnects by itself when the broker or the network goes away.
Runs until Ctrl-C or SIGTERM. Command-line flags override the config file. With no trainer
installed it refuses to start (exit status 2) and names the extra to install.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from fedprune.cli_common import setup_logging, take_sigint_as_ctrl_c
from fedprune.quiet_start import request_quiet_start
from fedprune.wait_notices import WaitNotices

log = logging.getLogger("fedprune.edge_agent.cli")

COMMANDS = ("run", "predict", "model")


def main(argv: list[str] | None = None) -> int:
    request_quiet_start()  # before anything loads TensorFlow
    take_sigint_as_ctrl_c()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "run")  # `fedprune-agent --broker ...` as before subcommands existed
    args = _parser().parse_args(argv)
    from fedprune.edge_agent.config import ConfigError

    try:
        return {"run": _run, "predict": _predict, "model": _model}[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprune-agent", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="join the federation (the default command)")
    _add_config_args(run)
    run.add_argument("--connection", type=Path,
                     help="connection file from fedprune-aggregator init-broker (devices/<id>/connection.toml): "
                          "broker URL, this device's id, credentials and CA; replaces --broker and --device-id")
    run.add_argument("--broker", help="MQTT broker URL, e.g. mqtt://laptop:1883 (config: broker.url)")
    run.add_argument("--device-id", help="this device's id, unique in the federation (config: device.id)")
    run.add_argument("--data", help="the local data, which stays on the device: an .npz with x_train and y_train, "
                                    "a .csv with a label column, or a folder of images with one subfolder per class "
                                    "(config: device.data)")
    run.add_argument("--label-column", help="a .csv's column of integer class ids (config: device.label_column, "
                                            "default 'label')")
    run.add_argument("--federation", help="federation id (config: broker.federation, default 'default')")
    run.add_argument("--aggregator-key", metavar="KEY",
                     help="the aggregator's public key, ed25519:... as fedprune-aggregator prints it, or the path "
                          "of its aggregator.pub; the agent accepts only messages it signed (config: "
                          "broker.aggregator_key; a --connection file holds it)")
    run.add_argument("--max-payload-bytes", type=int,
                     help="largest MQTT message sent; larger ones go in chunks (default 1,000,000)")
    run.add_argument("--max-message-bytes", type=int, help="largest whole message accepted (default 64,000,000)")
    run.add_argument("--max-train-memory-mb", type=float,
                     help="memory budget of the training child; above it the round fails (config: budgets)")
    run.add_argument("--max-round-s", type=float,
                     help="time budget of one round's training; after it the round fails (config: budgets)")
    run.add_argument("--model-export", choices=["int8", "float32", "off"],
                     help="the global model as sparse TFLite: each round's and the final one (config: model.export, "
                          "default int8)")
    run.add_argument("--trainer", choices=["auto", "keras", "litert"],
                     help="keras (TensorFlow), litert (no TensorFlow: a TFLite runtime), or auto: keras where "
                          "TensorFlow is installed, else litert (config: device.trainer, default auto)")
    run.add_argument("--in-process", action="store_true",
                     help="train in the agent's own process (with keras it loads TensorFlow: for development "
                          "hosts; no budgets)")
    run.add_argument("--emulate-uplink-kbps", type=float, help=argparse.SUPPRESS)  # benchmarks: a slow uplink
    run.add_argument("--emulate-latency-ms", type=float, default=0.0, help=argparse.SUPPRESS)

    predict = commands.add_parser("predict", help="run the current model on samples from a file")
    _add_config_args(predict)
    predict.add_argument("--input", required=True, help="samples: .npy, .npz (--key) or .csv (one per row)")
    predict.add_argument("--key", help="the array of an .npz (default x, x_test or x_train)")
    predict.add_argument("--model", help="a model folder or .tflite file (default: the agent's current model)")
    predict.add_argument("--runtime", action="append", choices=["litert", "tflite_runtime", "tensorflow"],
                         help="runtimes to try, in order (default litert, tflite_runtime, tensorflow)")
    predict.add_argument("--threads", type=int, help="interpreter threads (default: the runtime's)")
    predict.add_argument("--output", help="write each sample's result here: .csv (sample, class, confidence, one "
                                          "probability per class), .jsonl (one JSON object per sample) or .npy "
                                          "(the probabilities)")
    predict.add_argument("--json", action="store_true", help="print the summary as one JSON object (for scripts)")

    model = commands.add_parser("model", help="show the installed models, or roll back to the previous one")
    _add_config_args(model)
    model.add_argument("action", choices=["status", "rollback"])
    return parser


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="agent config file, e.g. /etc/fedprune/agent.toml")
    parser.add_argument("--state-dir", help="folder kept across restarts: error-feedback residuals, models "
                                            "(config: device.state_dir; default fedprune-state/<device id>)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (config: logging.level, default INFO)")


def _config(args: argparse.Namespace, require_run: bool):
    from fedprune.edge_agent.config import AgentConfig, load_config

    config = load_config(args.config) if args.config else AgentConfig()
    overrides = {"device.state_dir": args.state_dir, "logging.level": args.log_level}
    if args.command == "run":
        overrides.update({
            "broker.url": args.broker, "device.id": args.device_id, "device.data": args.data,
            "device.label_column": args.label_column,
            "broker.federation": args.federation, "broker.max_payload_bytes": args.max_payload_bytes,
            "broker.max_message_bytes": args.max_message_bytes,
            "budgets.max_train_memory_mb": args.max_train_memory_mb, "budgets.max_round_s": args.max_round_s,
            "model.export": args.model_export, "device.trainer": args.trainer,
            "broker.aggregator_key": args.aggregator_key,
        })
        connection = _connection(args)
        if connection is not None:  # the file names the broker (with credentials), the device and federation
            overrides.update({"broker.url": connection.broker.url, "device.id": connection.device_id,
                              "broker.federation": args.federation or connection.federation,
                              "broker.aggregator_key": args.aggregator_key or connection.aggregator_key})
    config = config.with_overrides(overrides).check(require_run=require_run)
    setup_logging(config.logging.level)
    return config


def _connection(args: argparse.Namespace):
    """The device's connection file (None without --connection); ConfigError if it is unusable."""
    if args.connection is None:
        return None
    from fedprune.edge_agent.config import ConfigError
    from fedprune.connection import ConnectionFileError, load_connection

    if args.broker or args.device_id:
        raise ConfigError("--connection already names the broker and the device; drop --broker and --device-id")
    try:
        connection = load_connection(args.connection)
    except ConnectionFileError as e:
        raise ConfigError(str(e)) from None
    if connection.role != "device":
        raise ConfigError(f"{args.connection} is the {connection.role}'s connection file, not a device's")
    return connection


def _run(args: argparse.Namespace) -> int:
    config = _config(args, require_run=True)
    connection = _connection(args)
    broker_url = connection.broker.full_url() if connection is not None else config.broker_url()
    from fedprune.architecture import register_custom_layers
    from fedprune.edge_agent.agent import EdgeAgent
    from fedprune.edge_agent.capabilities import NoTrainer, choose_trainer
    from fedprune.edge_agent.emulation import SlowLink
    from fedprune.data import DataError, load_device_data

    try:
        capabilities = choose_trainer(config.device.trainer)  # asks what is installed; imports nothing
    except NoTrainer as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device_id = config.device.id
    aggregator_key = config.verify_key()
    register_custom_layers(config.model.custom_layers)  # from this device's config only
    try:
        x, y = load_device_data(config.device.data, config.data_options)  # checked here: a bad file fails at start
        trainer, data, trainable_files = _trainer(args, config, capabilities.trainer, x, y)
        agent = EdgeAgent(broker_url, device_id, *data, trainer, aggregator_key=aggregator_key, num_samples=len(x),
                          federation=config.broker.federation, max_payload_bytes=config.broker.max_payload_bytes,
                          max_message_bytes=config.broker.max_message_bytes, state_dir=config.state_dir,
                          link=SlowLink(args.emulate_uplink_kbps, args.emulate_latency_ms)
                          if args.emulate_uplink_kbps else None,
                          trainer_kind=capabilities.trainer, runtime=capabilities.runtime,
                          trainable_files=trainable_files,
                          final_model=None if config.model.export == "off" else config.model.export)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(x)
    del x, y, data
    budgets = config.budget_limits
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    where = (f"with {capabilities.trainer} " + ("in this process (no budgets enforced)" if args.in_process else
             f"in a child process; budgets: memory {_limit(budgets.max_train_memory_mb, 'MB')}, "
             f"round {_limit(budgets.max_round_s, 's')}"))
    print(f"{device_id}: {n} local samples; connecting to {agent.session.address.url}, federation "
          f"'{config.broker.federation}'; training {where}; accepting messages signed by {aggregator_key.text}",
          flush=True)
    # Do not wait for the first connection: paho keeps retrying, so a device may start before the broker.
    agent.start(timeout_s=None)
    with WaitNotices(agent.activity, log):  # never silent for long: says what it waits for
        try:
            while not stop.wait(1.0):
                agent.check_federation()
        except KeyboardInterrupt:
            pass
    agent.stop()
    print(f"{device_id}: stopped after rounds {agent.completed_rounds}")
    return 0


def _trainer(args: argparse.Namespace, config, kind: str, x, y):
    """The trainer of ``kind`` ("keras" or "litert"), the data to hand the agent (None, None when
    the child reads the file itself), and the store of trainable files a "litert" device needs."""
    from fedprune.edge_agent.child_trainer import ChildProcessTrainer
    from fedprune.edge_agent.trainable_files import TrainableFiles

    files = TrainableFiles() if kind == "litert" else None
    if args.in_process:
        if kind == "keras":
            from fedprune.edge_agent.trainer import KerasTrainer

            return KerasTrainer(), (x, y), files
        from fedprune.edge_agent.litert_trainer import TrainableFileTrainer

        return TrainableFileTrainer(files), (x, y), files
    trainer = ChildProcessTrainer(config.state_dir, config.device.data, budgets=config.budget_limits,
                                  export_precision=config.model.export, data_options=config.data_options,
                                  trainer=kind, trainable_files=files)
    return trainer, (None, None), files  # the child reads the file; the agent keeps only the sample count


def _limit(value: float | None, unit: str) -> str:
    return "none" if value is None else f"{value:g} {unit}"


def _model_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "model", None):
        setup_logging(args.log_level or "WARNING")
        return Path(args.model)
    from fedprune.edge_agent.config import ConfigError

    config = _config(args, require_run=False)
    if not (args.state_dir or config.device.state_dir or config.device.id):
        raise ConfigError("say where the model is: --model, --state-dir, or --config with device.state_dir")
    return config.state_dir / "model"


def _predict(args: argparse.Namespace) -> int:
    """Run the model on the input file; print a summary (the per-sample results go to --output)."""
    from fedprune.converters.tflite_export import RUNTIMES
    from fedprune.edge_agent.inference import InputError, Predictor, load_inputs
    from fedprune.edge_agent.model_store import ModelStoreError
    from fedprune.edge_agent.predictions import prediction_summary, summary_lines, write_predictions

    try:
        source = _model_dir(args)
        x = load_inputs(args.input, args.key)
        predictor = Predictor(source, runtimes=tuple(args.runtime) if args.runtime else RUNTIMES,
                              num_threads=args.threads)
        classes, probabilities = predictor.classify(x)
        if args.output:
            write_predictions(args.output, classes, probabilities)
    except (InputError, ModelStoreError, FileNotFoundError, RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = predictor.model_info
    summary = prediction_summary(classes, probabilities, model=str(source), round=info.round if info else None,
                                 sha256=info.sha256 if info else None, runtime=predictor.runtime,
                                 delegates=predictor.delegates, output=args.output)
    print(json.dumps(summary) if args.json else "\n".join(summary_lines(summary)))
    return 0


def _model(args: argparse.Namespace) -> int:
    import dataclasses

    from fedprune.edge_agent.model_store import ModelStore, ModelStoreError

    folder = _model_dir(args)
    if not folder.is_dir():
        print(f"error: no model folder at {folder} (the agent creates it when it installs its first model)",
              file=sys.stderr)
        return 1
    store = ModelStore(folder, writer=args.action == "rollback")
    if args.action == "rollback":
        try:
            store.rollback()
        except ModelStoreError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    manifest = store.manifest()
    print(json.dumps({"folder": str(store.directory),
                      **{k: dataclasses.asdict(v) if v else None for k, v in manifest.items() if k != "incoming"}},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
