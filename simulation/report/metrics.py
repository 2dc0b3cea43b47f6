"""A run's per-round metrics as the report reads them: ``metrics.jsonl`` in, CSV out."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

# Round time in the order the report stacks it; "waiting" is the rest of the wall time.
TIME_PARTS = {
    "training": ("train_s",),
    "transfer": ("transfer_s",),
    "encode/decode": ("encode_s", "decode_s"),
    "aggregation": ("aggregate_s", "evaluate_s"),
}


@dataclass
class Run:
    """One run's rounds (``metrics.jsonl`` lines) under a label for legends."""

    label: str
    rounds: list[dict]

    @classmethod
    def load(cls, run_dir: str | Path, label: str | None = None) -> "Run":
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder with at least one round?")
        rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return cls(label or Path(run_dir).name, rounds)

    def column(self, key: str, default: float = 0.0) -> list[float]:
        return [float(r.get(key, default) or 0.0) for r in self.rounds]

    def cumulative_uplink(self) -> list[int]:
        total, out = 0, []
        for r in self.rounds:
            total += int(r.get("bytes_up", 0))
            out.append(total)
        return out

    def time_parts(self) -> dict[str, list[float]]:
        """Seconds per round in each part of ``TIME_PARTS``, and "waiting": the rest of the wall time."""
        parts = {name: [sum(float(r.get(k, 0.0)) for k in keys) for r in self.rounds]
                 for name, keys in TIME_PARTS.items()}
        wall = self.column("wall_s")
        parts["waiting"] = [max(0.0, w - sum(p[i] for p in parts.values())) for i, w in enumerate(wall)]
        return parts

    def time_to_accuracy(self, target: float, clock: str = "fleet_s") -> float | None:
        """Seconds (``clock`` summed over rounds: ``fleet_s``, ``wall_s``, or a part such as
        ``transfer_s``) until held-out accuracy first reaches ``target``; None if it never does."""
        elapsed = 0.0
        for r in self.rounds:
            elapsed += float(r.get(clock, r.get("wall_s", 0.0)))
            if r["accuracy"] >= target:
                return elapsed
        return None


def write_csv(run: Run, path: Path) -> Path:
    """One row per round; nested fields (per-layer sparsity, rejections) as ``field.key`` columns."""
    rows = []
    for r in run.rounds:
        row = {}
        for k, v in r.items():
            if isinstance(v, dict):
                row.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                row[k] = v
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
