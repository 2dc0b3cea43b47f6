"""The report's figures (matplotlib, drawn to PNG files without a display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedprune.simulation.report.metrics import Run  # noqa: E402


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rounds(run: Run) -> list[int]:
    return [int(r["round"]) for r in run.rounds]


def accuracy_vs_round(runs: list[Run], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        ax.plot(_rounds(run), run.column("accuracy"), marker="o", label=run.label)
    ax.set(xlabel="round", ylabel="held-out accuracy", title="Accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def accuracy_vs_uplink(runs: list[Run], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        ax.plot([b / 1e6 for b in run.cumulative_uplink()], run.column("accuracy"), marker="o", label=run.label)
    ax.set(xlabel="cumulative uplink (MB, all devices)", ylabel="held-out accuracy",
           title="Accuracy per uplink byte")
    ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def layer_sparsity(run: Run, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    layers = sorted({k for r in run.rounds for k in r.get("layer_sparsity", {})})
    for layer in layers:
        ax.plot(_rounds(run), [r.get("layer_sparsity", {}).get(layer, 0.0) for r in run.rounds],
                marker=".", label=layer)
    ax.plot(_rounds(run), run.column("sparsity"), color="black", linestyle="--", label="global")
    ax.set(xlabel="round", ylabel="sparsity (fraction of weights pruned)", ylim=(-0.02, 1.02),
           title=f"Sparsity per layer ({run.label})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def devices_per_round(run: Run, path: Path) -> Path:
    """Stacked bars: what became of the selected devices each round."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = _rounds(run)
    bottom = [0.0] * len(rounds)
    for key, colour in (("reported", "tab:green"), ("rejected", "tab:orange"), ("offline", "tab:gray"),
                        ("lost", "tab:red")):
        values = run.column(key)
        ax.bar(rounds, values, bottom=bottom, color=colour, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.plot(rounds, run.column("selected"), color="black", marker="_", markersize=20, linestyle="none",
            label="selected")
    ax.set(xlabel="round", ylabel="devices", title=f"Devices per round ({run.label})")
    ax.legend(fontsize="small")
    return _save(fig, path)


def round_time(run: Run, path: Path) -> Path:
    """Stacked bars: each round's wall time split into training, transfer, encode/decode,
    aggregation and waiting."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = _rounds(run)
    bottom = [0.0] * len(rounds)
    for name, values in run.time_parts().items():
        ax.bar(rounds, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    if any(r.get("fleet_s") for r in run.rounds):
        ax.plot(rounds, run.column("fleet_s"), color="black", marker="o", linestyle="none",
                label="fleet time (no simulator waiting)")
    ax.set(xlabel="round", ylabel="seconds", title=f"Round time ({run.label})")
    ax.legend(fontsize="small")
    return _save(fig, path)
