"""The status page's screenshot in docs/img/: a simulated federation (12 devices, digits) with the
page on, photographed by headless Chromium in the middle of a round.

    .venv/bin/python scripts/status_page_screenshot.py [--out docs/img/status-page.png]

Needs Debian's chromium (bash scripts/setup.sh dev installs it). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # browser.py and brokers.py: the tests' headless Chromium

TASK = {
    "seed": 3,
    "model": {"factory": "fedprune.models:digits_cnn"},
    "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 1.0},
    "federation": {"id": "clinics", "rounds": 8, "devices_per_round": 8, "min_devices": 4, "round_timeout_s": 60},
    "training": {"local_epochs": 2, "learning_rate": 0.003},
    "pruning": {"final_sparsity": 0.8, "begin_round": 1, "end_round": 6, "leave_dense": ["logits"]},
    "transport": {"uplink_precision": "int8"},
    "simulation": {"profiles": [{"name": "pi4", "weight": 3, "speed": 2.0},
                                {"name": "pi-zero", "weight": 1, "speed": 6.0, "uplink_kbps": 256}]},
}


def main(argv: list[str] | None = None) -> int:
    from browser import screenshot
    from brokers import free_port

    from fedprune.quiet_start import request_quiet_start

    request_quiet_start()
    from fedprune.simulation.cli import run_simulation
    from fedprune.task import parse_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "status-page.png")
    parser.add_argument("--at-round", type=int, default=5, help="photograph while this round collects updates")
    args = parser.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    taken = threading.Event()

    def on_update(progress) -> None:  # mid-round: some updates in, others still due
        if progress.round == args.at_round and progress.reported >= 3 and not taken.is_set():
            taken.set()
            screenshot(url, args.out, size=(1280, 900))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_simulation(parse_task(TASK), 12, Path(tmp) / "clinics-demo", export_tflite=False,
                       on_update=on_update, status_at=("127.0.0.1", port))
    print(json.dumps({"screenshot": str(args.out), "taken": taken.is_set(), "bytes": args.out.stat().st_size}))
    return 0 if taken.is_set() else 1


if __name__ == "__main__":
    sys.exit(main())
