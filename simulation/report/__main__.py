"""``python -m fedprune.simulation.report RUN_DIR [--compare OTHER_RUN_DIR ...]``: (re)write a run's report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedprune.simulation.report import Run, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedprune.simulation.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder with metrics.jsonl")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other run folders to draw beside it")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, compare=[Run.load(p) for p in args.compare])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
