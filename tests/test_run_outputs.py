"""What a run reports: an int8 file that is not smaller than the float32 one is said to be so,
sparsity over the prunable and over all weights, and tables whole in a log file."""

from __future__ import annotations

import numpy as np

from fedprune.aggregator.records import RoundRecord, sparsity_of_all


def test_an_int8_export_not_smaller_than_float32_is_reported_as_such(tmp_path, capsys):
    """On breast cancer the int8 file (14,080 B) was larger than the float32 one (10,436 B), and
    nothing said so. Per-tensor int8 made it smaller at 95 % (3,848 B against 5,464); at 99 % the
    int8 file is still the larger."""
    from fedprune.aggregator.export import export_models
    from fedprune.aggregator.records import RunResult
    from fedprune.cli_common import print_outcome
    from fedprune.data import load_dataset
    from fedprune.keras_setup import keras
    from fedprune.models import full_masks, get_layer_weights, mlp
    from fedprune.pruning.masks import prune_to_sparsity

    keras.utils.set_random_seed(0)
    data = load_dataset("breast_cancer")
    model = mlp(data.input_shape, 2)
    weights, _ = prune_to_sparsity(get_layer_weights(model), full_masks(model, ("logits",)), 0.99)
    exports = {e["precision"]: e for e in export_models(model, weights, tmp_path, data)}
    assert exports["int8"]["size_bytes"] >= exports["float32"]["size_bytes"]  # this small model: int8 is larger
    assert exports["int8"]["note"].startswith(f"not smaller than float32 ({exports['int8']['size_bytes']:,} B "
                                              f"against {exports['float32']['size_bytes']:,} B)")
    assert "note" not in exports["float32"]
    print_outcome(RunResult(tmp_path, [], 0.9, 0.99, 10_000, list(exports.values()), 0.93, {"logits": "left dense"}))
    out = capsys.readouterr().out
    assert "at sparsity 0.990 of the prunable weights (0.930 of all 10,000 weights)" in out
    assert "not pruned: logits (left dense)" in out
    assert f"model-int8.tflite: {exports['int8']['size_bytes']:,} bytes" in out and "; not smaller than float32" in out


def test_sparsity_over_all_weights_counts_what_is_never_pruned():
    masks = [np.array([[True, False], [False, False]]), None, np.ones(4, bool)]
    assert sparsity_of_all(masks, weight_count=4 + 6 + 4) == 3 / 14
    assert sparsity_of_all(masks, weight_count=0) == 0.0


def _record(r: int) -> RoundRecord:
    return RoundRecord(round=r, attempts=1, selected=200, reported=198, rejected=0, accuracy=0.2812 + r / 100,
                       loss=1.5, sparsity=0.85, layer_sparsity={}, pruned_this_round=True, bytes_down=12_345_678,
                       bytes_up=9_876_543, wall_s=123.4, train_loss=1.2, lost=2, fleet_s=101.2, train_s=9.87,
                       transfer_s=1.23, sparsity_all=0.796)


def test_the_summary_table_and_round_lines_are_whole_when_output_is_not_a_terminal():
    """In a log the table was cut to 80 columns: "rou…", "acc 0.28…"."""
    from fedprune.simulation.progress import LOG_WIDTH, log_console, round_line, summary_table

    console = log_console()  # pytest captures stdout: not a terminal
    assert console.width == LOG_WIDTH
    with console.capture() as captured:
        console.print(summary_table([_record(r) for r in range(1, 4)]))
        console.print(round_line(_record(3)))
    text = captured.get()
    header = next(line for line in text.splitlines() if "round" in line)
    for name in ("round", "devices", "lost", "acc", "sparsity", "of all", "MB up", "wall s", "fleet s", "train s",
                 "xfer s"):
        assert name in header, header
    assert "…" not in text and "0.3112" in text and "198/200" in text and "0.796" in text
    assert "round   3  devices 198/200 acc 0.3112  sparsity 0.850 (0.796 of all)  up   9,876,543 B  123.4 s" \
           "  offline 0  lost 2" in text.replace("\n", "")


def test_tensorboard_gets_epsilon_under_dp_and_leaves_out_what_is_not_a_number():
    from dataclasses import replace

    from fedprune.aggregator.tensorboard_log import SCALARS, scalars_of

    plain = scalars_of(_record(2))
    assert "privacy/epsilon" not in plain and plain["sparsity/all_weights"] == 0.796
    assert set(SCALARS.values()) <= set(RoundRecord.__dataclass_fields__)  # every tag is a field of the record
    private = scalars_of(replace(_record(2), epsilon=1.25, train_loss=float("nan"), layer_sparsity={"conv2/kernel": 0.9}))
    assert private["privacy/epsilon"] == 1.25 and "devices_training/loss" not in private
    assert private["sparsity_by_layer/conv2/kernel"] == 0.9
