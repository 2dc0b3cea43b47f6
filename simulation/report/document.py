"""The Markdown report itself: headline figures, a table per round, and the figures."""

from __future__ import annotations

import json
from pathlib import Path

from fedprune.simulation.report import plots
from fedprune.simulation.report.metrics import Run, write_csv


def write_report(
    run_dir: str | Path,
    *,
    label: str | None = None,
    compare: list[Run] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write ``report.md``, ``metrics.csv`` and ``plots/*.png`` into ``run_dir``; returns the report's path.

    ``compare``: other runs drawn beside this one in the accuracy figures (e.g. dense FedAvg);
    ``notes``: lines to put under the title (how the run was made).
    """
    run_dir = Path(run_dir)
    run = Run.load(run_dir, label)
    runs = [run, *(compare or [])]
    fig_dir = run_dir / "plots"
    fig_dir.mkdir(exist_ok=True)
    figures = {
        "Accuracy per round": plots.accuracy_vs_round(runs, fig_dir / "accuracy_vs_round.png"),
        "Accuracy per uplink byte": plots.accuracy_vs_uplink(runs, fig_dir / "accuracy_vs_uplink.png"),
        "Sparsity per layer": plots.layer_sparsity(run, fig_dir / "layer_sparsity.png"),
        "Devices per round": plots.devices_per_round(run, fig_dir / "devices_per_round.png"),
        "Round time": plots.round_time(run, fig_dir / "round_time.png"),
    }
    write_csv(run, run_dir / "metrics.csv")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}

    last = run.rounds[-1]
    lines = [f"# fedprune run report: {run.label}", ""]
    lines += [f"- {n}" for n in notes or []]
    lines += [
        f"- final held-out accuracy **{last['accuracy']:.4f}** at global sparsity **{last['sparsity']:.3f}** "
        f"after {len(run.rounds)} rounds",
        f"- uplink {sum(run.column('bytes_up')):,.0f} B, downlink {sum(run.column('bytes_down')):,.0f} B in total",
        f"- wall time {sum(run.column('wall_s')):.1f} s; fleet time {sum(run.column('fleet_s')):.1f} s "
        "(without the simulator's waiting for its shared trainer)",
        f"- updates: {sum(run.column('reported')):.0f} accepted, {sum(run.column('rejected')):.0f} rejected, "
        f"{sum(run.column('offline')):.0f} from devices gone offline, **{sum(run.column('lost')):.0f} lost**",
    ]
    for other in compare or []:
        lines.append(f"- compared with `{other.label}`: final accuracy {other.rounds[-1]['accuracy']:.4f}, "
                     f"uplink {sum(other.column('bytes_up')):,.0f} B")
    lines += [
        "",
        "| round | selected | reported | rejected | offline | lost | accuracy | sparsity | bytes up | "
        "wall s | fleet s | training s | transfer s | enc/dec s | aggregation s |",
        "|" + "---:|" * 15,
    ]
    parts = run.time_parts()
    for i, r in enumerate(run.rounds):
        lines.append(
            f"| {r['round']} | {r['selected']} | {r['reported']} | {r['rejected']} | {r.get('offline', 0)} | "
            f"{r.get('lost', 0)} | {r['accuracy']:.4f} | {r['sparsity']:.3f} | {r['bytes_up']:,} | "
            f"{r['wall_s']:.2f} | {r.get('fleet_s', 0.0):.2f} | {parts['training'][i]:.2f} | "
            f"{parts['transfer'][i]:.2f} | {parts['encode/decode'][i]:.3f} | {parts['aggregation'][i]:.3f} |")
    exports = summary.get("exports") or []
    if exports:
        lines += ["", "| exported model | bytes | TFLite accuracy | runtime |", "|---|---:|---:|---|"]
        for e in exports:
            lines.append(f"| {Path(e['path']).name} | {e['size_bytes']:,} | {e['accuracy']:.4f} | {e['runtime']} |")
    lines.append("")
    for title, path in figures.items():
        lines += [f"## {title}", "", f"![{title}](plots/{path.name})", ""]
    lines += ["Metrics per round: `metrics.jsonl` and `metrics.csv` in this folder.", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
