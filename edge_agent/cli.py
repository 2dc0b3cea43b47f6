"""``fedprune-agent``: join a federation from a device.

Connects to the broker, announces itself, trains when selected, sends its update, and reconnects
by itself when the broker or the network goes away. Runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from fedprune.cli_common import add_logging_args, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedprune-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="MQTT broker URL, e.g. mqtt://laptop:1883")
    parser.add_argument("--device-id", required=True, help="this device's id, unique in the federation")
    parser.add_argument("--data", required=True, help=".npz with x_train and y_train (stays on the device)")
    parser.add_argument("--federation", default="default", help="federation id (default 'default')")
    parser.add_argument("--max-payload-bytes", type=int, default=4_000_000,
                        help="largest message accepted or sent (default 4,000,000)")
    add_logging_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)

    from edge_agent.agent import EdgeAgent
    from edge_agent.trainer import KerasTrainer
    from fedprune.data import DataError, load_device_data

    try:
        x, y = load_device_data(args.data)
        agent = EdgeAgent(args.broker, args.device_id, x, y, KerasTrainer(), federation=args.federation,
                          max_payload_bytes=args.max_payload_bytes)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"{args.device_id}: {len(x)} local samples; connecting to {args.broker}", flush=True)
    # Do not wait for the first connection: paho keeps retrying, so a device may start before the broker.
    agent.start(timeout_s=None)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    agent.stop()
    print(f"{args.device_id}: stopped after rounds {agent.completed_rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
