"""Benchmark: BatchNormalization's moving statistics under federated averaging.

    .venv/bin/python scripts/bench_batchnorm.py                       # every row, seed 0
    .venv/bin/python scripts/bench_batchnorm.py --rows device-0.99,moving-0.99 --seed 0 1
    .venv/bin/python scripts/bench_batchnorm.py --trainer litert --rows device-0.99,device-0.9,moving-0.99

The digits CNN with a BatchNormalization after each hidden layer (``fedprune.models:digits_bn_cnn``),
3 simulated devices (Dirichlet 1.0), 8 rounds, 2 local epochs of batch 16 (Adam 0.002), dense,
float32 uplink. Rows: ``<statistics>-<momentum>``, statistics ``moving`` (the moving averages
Keras's momentum leaves after local training, averaged by FedAvg: what every release before
issue 19 did), ``device`` (each device sets them to the exact statistics of its trained weights
on its local data, ``edge_agent/batchnorm_stats.py``; FedAvg averages them: what fedprune does) or
``device-pooled`` (an experiment, not in the product: the same, and FedAvg's variance raised by the
sample-weighted spread of the device means, the variance of the union of the devices' data),
at momentum 0.99 (Keras's default) or 0.9. ``pruned-device-0.99`` adds the example's pruning (80 %,
int8 uplink). For each row: the final held-out accuracy of the global model (its moving
statistics), of the same weights normalized with batch statistics instead, and of the exported int8
TFLite model. ``--trainer litert``: the devices train without TensorFlow (the aggregator's
trainable TFLite file in LiteRT, ``edge_agent/litert_trainer.py``) instead of with Keras; the
statistics switch is ``LiteRTTrainer.recalibrate_batchnorm`` then. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedprune.cli_common import setup_logging  # noqa: E402
from fedprune.task import parse_task  # noqa: E402

STATISTICS = ("moving", "device", "device-pooled")
MOMENTA = ("0.99", "0.9")
ROWS = [f"{s}-{m}" for s in STATISTICS for m in MOMENTA] + ["pruned-device-0.99"]


def digits_bn_cnn_momentum_09(input_shape: tuple[int, ...], num_classes: int):
    """``fedprune.models:digits_bn_cnn`` at momentum 0.9: the comparison the target names."""
    from fedprune.models import _digits_bn

    return _digits_bn(input_shape, num_classes, momentum=0.9, name="digits_bn_cnn_09")


def task_for(row: str, rounds: int, devices: int, seed: int, epochs: int = 2, batch: int = 16, alpha: float = 1.0,
             trainer: str = "keras"):
    momentum = row.rsplit("-", 1)[1]
    factory = "fedprune.models:digits_bn_cnn" if momentum == "0.99" else "bench_batchnorm:digits_bn_cnn_momentum_09"
    raw = {
        "seed": seed,
        "model": {"factory": factory},
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": alpha},
        "federation": {"rounds": rounds, "devices_per_round": devices, "min_devices": devices,
                       "round_timeout_s": 300, "wait_for_devices_s": 120},
        "training": {"local_epochs": epochs, "batch_size": batch, "learning_rate": 0.002},
        "pruning": {"final_sparsity": 0.0},
        "transport": {"uplink_precision": "float32"},
        "simulation": {"profiles": [{"name": trainer, "trainer": trainer}]},
    }
    if row.startswith("pruned-"):
        raw["pruning"] = {"final_sparsity": 0.8, "begin_round": 2, "end_round": 6, "frequency": 2,
                          "leave_dense": ["logits"]}
        raw["transport"] = {"uplink_precision": "int8"}
    return parse_task(raw)


def batch_statistics_accuracy(task, weights) -> float:
    """Held-out accuracy of ``weights`` with every BatchNormalization normalizing with the test
    batch's own statistics (the whole held-out set as one batch): what the weights are worth once
    the statistics are right."""
    import numpy as np

    from fedprune.data import load_dataset
    from fedprune.models import build_model, set_layer_weights

    ds = load_dataset(task.data.dataset, task.data.path, task.data.test_fraction, task.seed, task.data.options)
    model = build_model(task.model.factory, ds.input_shape, ds.num_classes)
    set_layer_weights(model, weights)
    logits = model(ds.x_test.astype(np.float32), training=True)  # training=True: batch statistics, no update kept
    return float(np.mean(np.argmax(np.asarray(logits), axis=1) == ds.y_test))


def pooled_fedavg(names: list[str]):
    """FedAvg whose moving variances get the spread of the device means added (the pooled
    variance of the union of the devices' data), for the ``device-pooled`` rows."""
    import numpy as np

    from fedprune.aggregator.strategies.fedavg import FedAvg

    index = {n: i for i, n in enumerate(names)}
    pairs = [(i, index[n.removesuffix("moving_mean") + "moving_variance"]) for n, i in index.items()
             if n.endswith("/moving_mean")]
    plain = FedAvg.aggregate

    def aggregate(self, global_weights, results, masks):
        new = plain(self, global_weights, results, masks)
        total = float(sum(r.num_samples for r in results))
        for m, v in pairs:
            spread = sum((r.num_samples / total) * (np.float64(global_weights[m]) + r.delta[m] - new[m]) ** 2
                         for r in results)
            new[v] = (new[v] + spread).astype(np.float32)
        return new

    return plain, aggregate


def run_row(row: str, rounds: int, devices: int, seed: int, **setup) -> dict:
    from fedprune.aggregator.checkpoint import load_latest_checkpoint
    from fedprune.edge_agent.litert_trainer import LiteRTTrainer
    from fedprune.edge_agent.trainer import KerasTrainer
    from fedprune.simulation.cli import run_simulation

    from fedprune.aggregator.strategies.fedavg import FedAvg
    from fedprune.models import digits_bn_cnn, weight_names

    KerasTrainer.recalibrate_batchnorm = LiteRTTrainer.recalibrate_batchnorm = not row.startswith("moving-")
    plain, pooled = pooled_fedavg(weight_names(digits_bn_cnn((8, 8, 1), 10)))
    streaming = FedAvg.running
    if row.startswith("device-pooled-"):  # FedAvg on every update at once (not streamed), then pooled
        FedAvg.aggregate, FedAvg.running = pooled, lambda self, global_weights, masks: None
    task = task_for(row, rounds, devices, seed, **setup)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res = run_simulation(task, devices, Path(tmp) / "run")
        finally:
            FedAvg.aggregate, FedAvg.running = plain, streaming
        weights = load_latest_checkpoint(Path(tmp) / "run" / "checkpoints").weights
    int8 = next(e for e in res.exports if e["precision"] == "int8")
    return {"row": row, "trainer": task.simulation.profiles[0].trainer, "seed": seed, "rounds": rounds,
            "devices": devices,
            "accuracy": round(res.final_accuracy, 4),
            "batch_statistics_accuracy": round(batch_statistics_accuracy(task, weights), 4),
            "tflite_int8_accuracy": round(int8["accuracy"], 4),
            "accuracy_per_round": [round(x.accuracy, 4) for x in res.rounds],
            "bytes_up": int(sum(x.bytes_up for x in res.rounds)), "wall_s": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of the split")
    parser.add_argument("--trainer", choices=("keras", "litert"), default="keras",
                        help="what the devices train with: Keras, or the trainable TFLite file in LiteRT "
                        "(no TensorFlow)")
    parser.add_argument("--out", type=Path, help="write the results (JSON) here too")
    args = parser.parse_args()
    setup_logging("ERROR")
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; rows: {ROWS}")
    results = []
    for row in rows:
        for seed in args.seed:
            r = run_row(row, args.rounds, args.devices, seed, epochs=args.local_epochs, batch=args.batch_size,
                        alpha=args.alpha, trainer=args.trainer)
            results.append(r)
            print(f"{row:<20} {args.trainer:<6} seed {seed} acc {r['accuracy']:.4f}  "
                  f"batch-stats {r['batch_statistics_accuracy']:.4f}  int8 tflite {r['tflite_int8_accuracy']:.4f}  "
                  f"({r['wall_s']} s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps({"benchmark": "batchnorm", "results": [
        {k: r[k] for k in ("row", "trainer", "seed", "accuracy", "batch_statistics_accuracy", "tflite_int8_accuracy")}
        for r in results]}))


if __name__ == "__main__":
    main()
