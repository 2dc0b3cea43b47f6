"""Mutation fuzzer for ``fedprune-agent predict``: mutated ``.tflite`` files must be errors, never
the end of the process that predicts.

Each mutation of a small sparse model (a bit flip, a byte set to 0x00/0xFF/random, a 32-bit
field overwritten with an extreme value, a truncation) is run twice:

1. raw, in a child (``python -m fedprune.edge_agent.model_check``: LiteRT loads it and runs one
   sample), to see what the runtime does with it: ``ok``, ``refused`` (an exception), ``crash``
   (a signal) or ``hang`` (past the timeout);
2. through :class:`fedprune.edge_agent.inference.Predictor` in this process, which must either
   load it and predict (then zeros and random samples are run in-process too) or raise one
   ``ModelCheckError``/``ValueError``/``RuntimeError``. If this process dies, the mutation it
   was on is the last ``trying`` line on stderr.

    python scripts/fuzz_tflite.py --mutations 300 --seed 1       # JSON summary on the last line

The known-bad mutations it finds for ``tests/data/tiny-int8.tflite`` are pinned in
``tests/test_model_check.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy as np  # noqa: E402

from fedprune.edge_agent.inference import Predictor  # noqa: E402
from fedprune.edge_agent.model_check import ModelCheckError, check_tflite, forget_checks  # noqa: E402

DEFAULT_MODEL = ROOT / "tests" / "data" / "tiny-int8.tflite"
EXTREMES = (0x00000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x0000FFFF, 0x00010000)


def mutate(data: bytes, rng: np.random.Generator) -> tuple[dict, bytes]:
    """One random mutation of ``data``: (what was done, the mutated bytes)."""
    kind = rng.choice(["bit", "byte", "u32", "truncate"], p=[0.3, 0.3, 0.35, 0.05])
    out = bytearray(data)
    if kind == "truncate":
        at = int(rng.integers(8, len(data)))
        return {"kind": "truncate", "at": at}, bytes(out[:at])
    offset = int(rng.integers(4, len(data) - 4))  # the root offset (bytes 0-3) is too easy a target
    if kind == "bit":
        bit = int(rng.integers(8))
        out[offset] ^= 1 << bit
        return {"kind": "bit", "offset": offset, "bit": bit}, bytes(out)
    if kind == "byte":
        value = int(rng.choice([0x00, 0xFF, int(rng.integers(256))]))
        out[offset] = value
        return {"kind": "byte", "offset": offset, "value": value}, bytes(out)
    offset -= offset % 4  # flatbuffer fields are 4-byte aligned
    value = int(rng.choice(EXTREMES))
    out[offset:offset + 4] = value.to_bytes(4, "little")
    return {"kind": "u32", "offset": offset, "value": value}, bytes(out)


def apply(data: bytes, mutation: dict) -> bytes:
    """``mutation`` (as ``mutate`` describes it) applied to ``data`` again."""
    out = bytearray(data)
    if mutation["kind"] == "truncate":
        return bytes(out[:mutation["at"]])
    if mutation["kind"] == "bit":
        out[mutation["offset"]] ^= 1 << mutation["bit"]
    elif mutation["kind"] == "byte":
        out[mutation["offset"]] = mutation["value"]
    else:
        out[mutation["offset"]:mutation["offset"] + 4] = mutation["value"].to_bytes(4, "little")
    return bytes(out)


def raw_outcome(data: bytes, timeout_s: float) -> str:
    """What LiteRT does with ``data`` in a child: ok, refused, crash (SIGNAME) or hang."""
    try:
        check_tflite(data, ("litert",), timeout_s=timeout_s)
    except ModelCheckError as e:
        text = str(e)
        if "crashed" in text:
            return "crash (" + text.split("(")[1].split(")")[0] + ")"
        return "hang" if "did not load and run" in text else "refused"
    return "ok"


def through_predictor(path: Path, timeout_s: float, rng: np.random.Generator) -> str:
    """What ``Predictor`` makes of the file, in this process: "predicted" or the error's type."""
    forget_checks()  # check every mutation again, as a fresh process would
    try:
        p = Predictor(path, runtimes=("litert",))
        x = np.concatenate([np.zeros((1, *p.input_shape), np.float32),
                            rng.normal(0, 10, (4, *p.input_shape)).astype(np.float32)])
        p.predict(x)
        return "predicted"
    except (ModelCheckError, ValueError, RuntimeError) as e:
        return type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the .tflite file to mutate")
    parser.add_argument("--mutations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="a child running longer hangs")
    args = parser.parse_args(argv)
    data = args.model.read_bytes()
    rng = np.random.default_rng(args.seed)
    counts: dict[str, int] = {}
    predictor: dict[str, int] = {}
    bad: list[dict] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutated.tflite"
        for i in range(args.mutations):
            mutation, mutated = mutate(data, rng)
            print(f"trying {i}: {json.dumps(mutation)}", file=sys.stderr, flush=True)
            outcome = raw_outcome(mutated, args.timeout_s)
            counts[outcome.split(" ")[0]] = counts.get(outcome.split(" ")[0], 0) + 1
            path.write_bytes(mutated)
            result = through_predictor(path, args.timeout_s, rng)
            predictor[result] = predictor.get(result, 0) + 1
            if outcome.startswith(("crash", "hang")):
                bad.append({**mutation, "raw": outcome, "predictor": result})
    print(json.dumps({"model": str(args.model), "mutations": args.mutations, "seed": args.seed,
                      "raw": counts, "predictor": predictor, "process_survived": True,
                      "crashes_and_hangs": bad, "wall_s": round(time.monotonic() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
