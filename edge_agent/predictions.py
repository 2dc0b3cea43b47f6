"""What ``fedprune-agent predict`` reports: a summary of a batch of predictions for the terminal
(or one JSON object with ``--json``), and each sample's result in a file (``--output``).

Printing every sample's class and confidence on one JSON line made a few hundred samples
unreadable and no easier for a program to use than a file; the file is the per-sample record.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OUTPUT_SUFFIXES", "prediction_summary", "summary_lines", "write_predictions"]

OUTPUT_SUFFIXES = (".csv", ".jsonl", ".npy")


def write_predictions(path: str | Path, classes: np.ndarray, probabilities: np.ndarray) -> Path:
    """Each sample's class, confidence and class probabilities, as the suffix says: ``.csv`` (a
    header, one row per sample), ``.jsonl`` (one object per sample) or ``.npy`` (the probabilities)."""
    p = Path(path)
    confidence = probabilities.max(axis=-1)
    if p.suffix == ".npy":
        np.save(p, probabilities)
    elif p.suffix == ".csv":
        header = ["sample", "class", "confidence", *(f"p{k}" for k in range(probabilities.shape[-1]))]
        rows = [",".join([str(i), str(int(c)), f"{confidence[i]:.6f}", *(f"{v:.6f}" for v in probabilities[i])])
                for i, c in enumerate(classes)]
        p.write_text("\n".join([",".join(header), *rows]) + "\n")
    elif p.suffix == ".jsonl":
        p.write_text("".join(json.dumps({"sample": i, "class": int(c), "confidence": round(float(confidence[i]), 6),
                                         "probabilities": [round(float(v), 6) for v in probabilities[i]]}) + "\n"
                             for i, c in enumerate(classes)))
    else:
        raise ValueError(f"--output {p}: unknown format {p.suffix!r}; use one of {', '.join(OUTPUT_SUFFIXES)}")
    return p


def prediction_summary(classes: np.ndarray, probabilities: np.ndarray, **about: Any) -> dict[str, Any]:
    """The model and runtime (``about``), how many samples, how many per class, and the confidence
    (mean, and the least confident sample)."""
    confidence = probabilities.max(axis=-1) if len(classes) else np.zeros(0)
    counts = Counter(int(c) for c in classes)
    least = int(np.argmin(confidence)) if len(confidence) else None
    return {**about, "samples": int(len(classes)), "class_counts": {str(k): counts[k] for k in sorted(counts)},
            "mean_confidence": round(float(confidence.mean()), 4) if len(confidence) else None,
            "least_confident": None if least is None else {"sample": least,
                                                           "confidence": round(float(confidence[least]), 4)}}


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The summary for a person: three or four lines."""
    model = f"model {s['model']}" + (f" (round {s['round']}, sha256 {s['sha256'][:12]})" if s.get("sha256") else "")
    lines = [f"{model} on {s['runtime']} ({s['delegates']})"]
    counts = ", ".join(f"class {k}: {n}" for k, n in s["class_counts"].items())
    lines.append(f"{s['samples']} samples: {counts or 'none'}")
    if s["least_confident"] is not None:
        low = s["least_confident"]
        lines.append(f"confidence: mean {s['mean_confidence']:.4f}, lowest {low['confidence']:.4f} "
                     f"(sample {low['sample']})")
    lines.append(f"each sample's class and confidence: {s['output']}" if s.get("output")
                 else "add --output results.csv for each sample's class, confidence and probabilities")
    return lines
