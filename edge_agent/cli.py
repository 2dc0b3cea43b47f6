"""``fedprune-agent``: join a federation from a device.

Connects to the broker, announces itself, trains when selected, sends its update, and reconnects
by itself when the broker or the network goes away. Runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from fedprune.cli_common import add_logging_args, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedprune-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--connection", type=Path,
                        help="connection file from fedprune-aggregator init-broker (devices/<id>/connection.toml): "
                             "broker URL, this device's id, credentials and CA; replaces --broker and --device-id")
    parser.add_argument("--broker", help="MQTT broker URL, e.g. mqtt://laptop:1883 (or use --connection)")
    parser.add_argument("--device-id", help="this device's id, unique in the federation (or use --connection)")
    parser.add_argument("--data", required=True, help=".npz with x_train and y_train (stays on the device)")
    parser.add_argument("--federation", default=None, help="federation id (default 'default', or the connection file's)")
    parser.add_argument("--max-payload-bytes", type=int, default=1_000_000,
                        help="largest MQTT message sent; larger ones go in chunks (default 1,000,000)")
    parser.add_argument("--max-message-bytes", type=int, default=64_000_000,
                        help="largest whole message accepted (default 64,000,000)")
    parser.add_argument("--state-dir", default=None,
                        help="folder for state kept across restarts (error-feedback residuals); "
                             "default: fedprune-state/<device id>")
    add_logging_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    broker_url, device_id, federation = args.broker, args.device_id, args.federation or "default"
    if args.connection is not None:
        from fedprune.connection import ConnectionFileError, load_connection

        if args.broker or args.device_id:
            parser.error("--connection already names the broker and the device; drop --broker and --device-id")
        try:
            connection = load_connection(args.connection)
        except ConnectionFileError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if connection.role != "device":
            print(f"error: {args.connection} is the {connection.role}'s connection file, not a device's", file=sys.stderr)
            return 2
        broker_url, device_id = connection.broker.full_url(), connection.device_id
        federation = args.federation or connection.federation
    elif not (args.broker and args.device_id):
        parser.error("give --connection FILE, or both --broker and --device-id")

    from edge_agent.agent import EdgeAgent
    from edge_agent.trainer import KerasTrainer
    from fedprune.data import DataError, load_device_data

    try:
        x, y = load_device_data(args.data)
        agent = EdgeAgent(broker_url, device_id, x, y, KerasTrainer(), federation=federation,
                          max_payload_bytes=args.max_payload_bytes, max_message_bytes=args.max_message_bytes,
                          state_dir=args.state_dir or f"fedprune-state/{device_id}")
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"{device_id}: {len(x)} local samples; connecting to {agent.session.address.url}", flush=True)
    # Do not wait for the first connection: paho keeps retrying, so a device may start before the broker.
    agent.start(timeout_s=None)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    agent.stop()
    print(f"{device_id}: stopped after rounds {agent.completed_rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
