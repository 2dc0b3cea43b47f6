"""Benchmark: each fault scenario on a small federation of real processes; a table, then one JSON line.

    .venv/bin/python scripts/bench_faults.py                         # every scenario
    .venv/bin/python scripts/bench_faults.py --only clean "broker restarted"

Every scenario starts afresh: a Mosquitto with the TLS + per-device ACL set-up of ``init-broker``,
one ``fedprune-agent`` process per device and a ``fedprune-aggregator`` process (digits CNN, 3
devices, 3 rounds, pruned to 50 %), and injects its fault mid-round (``tests/fleet.py``). Each row
says how many rounds completed, how many were lost (must be 0) or applied twice (must be none),
how many updates each round counted, what the aggregator rejected and why, and the final held-out
accuracy against the clean run.

``SCENARIOS`` maps a name to a function that takes a started ``Fleet``, runs the aggregator to its
end with the fault injected, and returns notes; add a scenario (an attack, say) by adding an entry.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "tests"))  # the fleet harness and the Mosquitto runner

import fleet as fleet_harness  # noqa: E402
from fleet import Fleet  # noqa: E402

DEVICES = ["pi-01", "pi-02", "pi-03"]
ROUNDS = 3
# Generous: on a loaded 2-core machine one local training can take tens of seconds. A killed device
# does not make its round wait this long (its last will marks it offline at once).
ROUND_TIMEOUT_S = 120


def fuzzed_updates(fleet: Fleet) -> dict:
    """The MQTT fuzzer (scripts/fuzz_aggregator.py) sends 100 payloads a second on the update
    topics, logged in with the aggregator's credentials, while the federation runs."""
    import random

    from fuzz_aggregator import Fuzzer, PayloadGenerator

    from fedprune.converters.protocol import Topics

    topics = Topics(fleet.folder.federation)
    fuzzer = Fuzzer(fleet.tool_url, topics,
                    PayloadGenerator(topics, random.Random(0), 1_000_000))
    try:
        fleet.start_aggregator()
        while fleet.aggregator.poll() is None:
            fuzzer.send(1)
            time.sleep(0.01)
        fleet.finish_aggregator()
    finally:
        fuzzer.close()
    return {"fuzz_payloads": sum(fuzzer.sent.values())}


SCENARIOS = {**fleet_harness.SCENARIOS, "fuzzed updates": fuzzed_updates}


def run_scenario(name: str, workdir: Path) -> dict:
    start = time.monotonic()
    error = None
    with Fleet(workdir, DEVICES, rounds=ROUNDS, round_timeout_s=ROUND_TIMEOUT_S) as fleet:
        try:
            notes = SCENARIOS[name](fleet)
        except AssertionError as e:  # a process failed: report it in the table
            notes, error = {}, str(e).splitlines()[-1][:200]
    rec = fleet.record() if (fleet.run_dir / "metrics.jsonl").is_file() else None
    rounds = sorted(set(rec.rounds)) if rec else []
    return {
        "rounds_completed": len(rounds),
        "rounds_lost": ROUNDS - len(rounds),
        "rounds_applied_twice": rec.applied_twice if rec else [],
        "updates_counted": rec.reported if rec else [],
        "rejected": rec.rejections if rec else {},
        "final_accuracy": round(rec.accuracy, 4) if rec else None,
        "wall_s": round(time.monotonic() - start, 1),
        "notes": notes,
        "error": error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="run these scenarios only")
    args = parser.parse_args(argv)
    names = args.only or list(SCENARIOS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            print(f"running: {name}", flush=True)
            results[name] = run_scenario(name, Path(tmp) / f"s{i}")
    clean = results.get("clean", {}).get("final_accuracy")
    print()
    print("| scenario | rounds completed | rounds lost | applied twice | updates counted per round | "
          "rejected (why) | final accuracy | vs clean | wall s |")
    print("|---|---:|---:|---|---|---|---:|---:|---:|")
    for name, r in results.items():
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items())) or "none"
        acc = r["final_accuracy"]
        delta = f"{acc - clean:+.4f}" if acc is not None and clean is not None else "n/a"
        print(f"| {name} | {r['rounds_completed']}/{ROUNDS} | {r['rounds_lost']} | "
              f"{r['rounds_applied_twice'] or 'none'} | {r['updates_counted']} | {rejected} | "
              f"{acc if acc is not None else 'n/a'} | {delta} | {r['wall_s']} |")
        if r["error"]:
            print(f"|   ↳ error | {r['error']} |")
    ok = all(r["rounds_lost"] == 0 and not r["rounds_applied_twice"] and not r["error"] for r in results.values())
    print(json.dumps({"benchmark": "faults", "devices": len(DEVICES), "rounds": ROUNDS, "ok": ok,
                      "scenarios": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
