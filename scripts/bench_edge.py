"""Benchmark: the edge agent under an emulated Raspberry Pi, and the model it runs.

    .venv/bin/python scripts/bench_edge.py                 # all of it, about 3 minutes on 2 cores
    .venv/bin/python scripts/bench_edge.py --no-profile    # without the CPU/memory/link emulation

Profile (``fedprune.edge_agent.emulation.PI_PROFILE``): one CPU (taskset), a 4 GB address-space cap
(prlimit), a 2 Mbit/s uplink with 50 ms per message; this script itself runs on the same CPU.

1. **The model.** The digits CNN (``fedprune.models:digits_cnn``) trained centrally with Keras,
   conv2 and dense1 (99 % of the weights; conv1 and the logits stay dense, as usual) pruned to
   90 % by magnitude and fine-tuned with the mask held (``KerasTrainer``, the device's own
   trainer). Exported as dense float32, sparse float32 and sparse int8 TFLite; for each: file
   size, held-out accuracy and single-sample latency in every runtime that is installed.
2. **The agent.** ``fedprune-agent run`` (child-process training) on the embedded broker, with a
   10th of the training set: idle RSS, then one round of the pruned model (local_epochs 2, as in
   ``examples/digits.toml``): the training child's peak RSS (VmHWM, sampled by this script), its
   time to the update and per local epoch, the agent's RSS after the round, the model it
   installed, and ``fedprune-agent predict`` on the test set (its peak RSS, no TensorFlow).

Training without TensorFlow (``LiteRTTrainer``) is measured by ``scripts/bench_litert_trainer.py``.

Targets: idle agent under 60 MB RSS; sparse int8 at 90 % at most 1/8 of the dense float32 file,
with accuracy within 0.5 points of the Keras model. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fedprune.edge_agent.budgets import peak_rss_mb, rss_mb  # noqa: E402
from fedprune.edge_agent.emulation import PI_PROFILE, DeviceProfile  # noqa: E402

SPARSITY = 0.9
LEAVE_DENSE = ("conv1", "logits")
RUNTIMES = ("litert", "tflite_runtime", "tensorflow")


def train_model(ds, epochs: int, fine_tune_epochs: int, seed: int = 0) -> dict:
    """Dense Keras model, then pruned to 90 % and fine-tuned under the mask by the device trainer."""
    from fedprune.architecture import model_from_architecture_json
    from fedprune.converters.protocol import TrainTask
    from fedprune.edge_agent.trainer import KerasTrainer
    from fedprune.keras_setup import keras, tf
    from fedprune.models import architecture_of, digits_cnn, full_masks, get_layer_weights, set_layer_weights
    from fedprune.pruning.masks import prune_to_sparsity, sparsity

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    dense = digits_cnn(ds.input_shape, ds.num_classes)
    dense.compile(optimizer=keras.optimizers.Adam(0.002), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dense.fit(ds.x_train, ds.y_train, epochs=epochs, batch_size=16, verbose=0)
    dense_acc = float(dense.evaluate(ds.x_test, ds.y_test, verbose=0)[1])

    arch = architecture_of(dense)
    weights, masks = prune_to_sparsity(get_layer_weights(dense), full_masks(dense, LEAVE_DENSE), SPARSITY)
    task = TrainTask(round=1, attempt=1, architecture_digest=arch.digest, weights=weights, masks=masks,
                     training={"local_epochs": fine_tune_epochs, "batch_size": 16, "optimizer": "adam",
                               "learning_rate": 0.001},
                     uplink_precision="float32", deadline_s=600)
    result = KerasTrainer().train(arch, task, ds.x_train, ds.y_train)
    pruned_weights = [w + d for w, d in zip(weights, result.delta)]
    pruned = model_from_architecture_json(arch.model_json)
    set_layer_weights(pruned, pruned_weights)
    pruned.compile(metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned_acc = float(pruned.evaluate(ds.x_test, ds.y_test, verbose=0)[1])
    return {"dense": dense, "pruned": pruned, "arch": arch, "weights": pruned_weights, "masks": masks,
            "dense_acc": dense_acc, "pruned_acc": pruned_acc, "mask_sparsity": sparsity(masks)}


def tflite_rows(m: dict, ds, out: Path) -> dict:
    from fedprune.converters.tflite_export import export_sparse_tflite
    from fedprune.edge_agent.inference import Predictor

    files = {
        "dense_float32": export_sparse_tflite(m["dense"], out / "dense_float32.tflite", "float32").path,
        "sparse_float32": export_sparse_tflite(m["pruned"], out / "sparse_float32.tflite", "float32").path,
        "sparse_int8": export_sparse_tflite(m["pruned"], out / "sparse_int8.tflite", "int8",
                                            representative_x=ds.x_train).path,
    }
    rows = {}
    for name, path in files.items():
        row = {"bytes": path.stat().st_size, "runtimes": {}}
        for runtime in RUNTIMES:
            try:
                p = Predictor(path, runtimes=(runtime,), num_threads=1)
            except RuntimeError as e:
                row["runtimes"][runtime] = {"error": str(e).split(":")[0]}
                continue
            classes, _ = p.classify(ds.x_test)
            row["runtimes"][runtime] = {
                "label": f"{p.runtime} ({p.delegates})",
                "accuracy": round(float(np.mean(classes == ds.y_test)), 4),
                "latency_ms": round(p.latency_ms(ds.x_test, repeats=200), 4),
            }
        rows[name] = row
        print(f"  {name:15s} {row['bytes']:>9,} B  " + "  ".join(
            f"{r}: acc {v['accuracy']:.4f} {v['latency_ms']:.3f} ms" for r, v in row["runtimes"].items()
            if "accuracy" in v), flush=True)
    return rows


def agent_round(m: dict, ds, profile: DeviceProfile | None, work: Path, idle_s: float) -> dict:
    from fedprune.aggregator.embedded_broker import EmbeddedBroker
    from fedprune.converters.protocol import Topics, TrainTask, decode_update, encode_task
    from fedprune.edge_agent.model_store import ModelStore
    from fedprune.data import partition

    sys.path.insert(0, str(ROOT / "tests"))
    from edge_helpers import training_child_pid, wait_for
    from federation_helpers import Spy
    from signing_helpers import VERIFY_KEY, signed  # the bench plays the aggregator's part

    idx = partition(ds.y_train, 10, "iid", seed=0)[0]
    data = work / "device.npz"
    np.savez(data, x_train=ds.x_train[idx], y_train=ds.y_train[idx])
    np.save(work / "test.npy", ds.x_test)
    prefix = profile.command_prefix() if profile else []
    link = ["--emulate-uplink-kbps", str(profile.uplink_kbps), "--emulate-latency-ms", str(profile.latency_ms)] \
        if profile and profile.uplink_kbps else []
    topics = Topics("default")
    out: dict = {"device_samples": int(len(idx))}
    with EmbeddedBroker() as broker:
        spy = Spy(broker.url, [f"{topics.root}/#"])
        log = open(work / "agent.log", "wb")  # noqa: SIM115
        agent = subprocess.Popen([*prefix, sys.executable, "-m", "fedprune.edge_agent.cli", "run", "--broker", broker.url,
                                  "--device-id", "bench-pi", "--data", str(data), "--state-dir", str(work / "state"),
                                  "--max-round-s", "600", "--log-level", "INFO", "--aggregator-key", VERIFY_KEY.text,
                                  *link],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: spy.on("/presence/bench-pi"), 60, "the agent's presence")
            time.sleep(idle_s)
            out["idle_agent_rss_mb"] = round(rss_mb(agent.pid), 1)
            out["idle_agent_peak_rss_mb"] = round(peak_rss_mb(agent.pid), 1)
            epochs = 2
            task = TrainTask(round=1, attempt=1, architecture_digest=m["arch"].digest, weights=m["weights"],
                             masks=m["masks"], training={"local_epochs": epochs, "batch_size": 16,
                                                         "optimizer": "adam", "learning_rate": 0.002},
                             uplink_precision="int8", deadline_s=600, session="bench")
            spy.client.publish(topics.architecture, signed(topics.architecture, m["arch"].encode()), qos=1,
                               retain=True).wait_for_publish(5)
            start = time.monotonic()
            task_topic = topics.task("bench-pi")
            spy.client.publish(task_topic, signed(task_topic, encode_task(task, m["arch"].names)),
                               qos=1, retain=True).wait_for_publish(5)
            child_peak, update = 0.0, None
            while update is None or training_child_pid(work / "state") is not None:
                pid = training_child_pid(work / "state")
                if pid is not None:
                    child_peak = max(child_peak, peak_rss_mb(pid) or 0.0)
                if update is None and spy.on("/update"):
                    update = decode_update(spy.on("/update")[0][1], m["arch"].shapes, m["masks"], 1 << 26,
                                           names=m["arch"].names)
                    out["round_to_update_s"] = round(time.monotonic() - start, 2)
                if time.monotonic() - start > 600:
                    raise TimeoutError("no update within 600 s; see " + str(work / "agent.log"))
                time.sleep(0.02)
            if update.error:
                raise RuntimeError(f"the round failed on the device: {update.error}")
            out["child_exit_s"] = round(time.monotonic() - start, 2)
            out["child_peak_rss_mb"] = round(child_peak, 1)
            out["child_peak_rss_at_result_mb"] = round(update.metrics["train_peak_rss_mb"], 1)
            out["local_epochs"] = epochs
            out["fit_s"] = round(update.metrics["train_s"], 2)
            out["fit_s_per_epoch"] = round(update.metrics["train_s"] / epochs, 2)  # with the first trace
            out["steady_epoch_s"] = round(update.metrics["last_epoch_s"], 3)
            out["update_bytes"] = len(spy.on("/update")[0][1])
            installed = wait_for(lambda: ModelStore(work / "state" / "model").current(), 120, "the model install")
            out["installed_model"] = {"round": installed.round, "precision": installed.precision,
                                      "bytes": installed.size_bytes, "sparsity": round(installed.sparsity, 4),
                                      "runtime": installed.runtime}
            time.sleep(1.0)
            out["agent_rss_after_round_mb"] = round(rss_mb(agent.pid), 1)
            out["agent_peak_rss_mb"] = round(peak_rss_mb(agent.pid), 1)
            out["predict"] = _predict(prefix, work)
            out["predict"]["accuracy"] = round(float(np.mean(np.array(out["predict"].pop("classes")) == ds.y_test)), 4)
        finally:
            agent.terminate()
            agent.wait(30)
            spy.close()
    return out


_PREDICT = """
import json, sys
from fedprune.edge_agent.cli import main
rc = main(sys.argv[1:])
from fedprune.edge_agent.budgets import peak_rss_mb
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "tensorflow_loaded": "tensorflow" in sys.modules}))
sys.exit(rc)
"""


def _predict(prefix: list[str], work: Path) -> dict:
    start = time.monotonic()
    proc = subprocess.run([*prefix, sys.executable, "-c", _PREDICT, "predict", "--state-dir", str(work / "state"),
                           "--input", str(work / "test.npy"), "--json", "--output", str(work / "probabilities.npy")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"fedprune-agent predict failed: {proc.stderr}")
    lines = proc.stdout.strip().splitlines()
    result, process = json.loads(lines[-2]), json.loads(lines[-1])
    classes = np.load(work / "probabilities.npy").argmax(axis=1).tolist()
    return {"runtime": f"{result['runtime']} ({result['delegates']})", "classes": classes,
            "process_peak_rss_mb": round(process["peak_rss_mb"], 1), "tensorflow_loaded": process["tensorflow_loaded"],
            "process_wall_s": round(time.monotonic() - start, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="dense Keras training epochs (default 20)")
    parser.add_argument("--fine-tune-epochs", type=int, default=10, help="epochs under the 90 %% mask (default 10)")
    parser.add_argument("--no-profile", action="store_true", help="run without the Pi emulation")
    parser.add_argument("--idle-s", type=float, default=5.0, help="how long the agent idles before its RSS is read")
    parser.add_argument("--out", type=Path, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()

    profile = None if args.no_profile else PI_PROFILE
    if profile:
        os.sched_setaffinity(0, profile.cpu_set())  # this process too: inference latency on one core
    from fedprune.data import load_dataset

    ds = load_dataset("digits", test_fraction=0.2, seed=0)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-edge-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"profile: {profile}; files in {work}", flush=True)
    start = time.monotonic()
    m = train_model(ds, args.epochs, args.fine_tune_epochs)
    print(f"keras: dense {m['dense_acc']:.4f}, pruned to {m['mask_sparsity']:.3f} {m['pruned_acc']:.4f} "
          f"({time.monotonic() - start:.0f} s)", flush=True)
    tflite = tflite_rows(m, ds, work)
    agent = agent_round(m, ds, profile, work, args.idle_s)
    print(f"agent: idle {agent['idle_agent_rss_mb']} MB; child peak {agent['child_peak_rss_mb']} MB; update after "
          f"{agent['round_to_update_s']} s (fit {agent['fit_s']} s for {agent['local_epochs']} epochs, the last "
          f"{agent['steady_epoch_s']} s); predict peak "
          f"{agent['predict']['process_peak_rss_mb']} MB", flush=True)

    int8, dense = tflite["sparse_int8"], tflite["dense_float32"]
    int8_acc = int8["runtimes"]["litert"]["accuracy"]
    targets = {
        "idle_agent_under_60mb": agent["idle_agent_rss_mb"] < 60,
        "int8_at_most_eighth_of_dense": int8["bytes"] * 8 <= dense["bytes"],
        "int8_within_half_point_of_keras": abs(int8_acc - m["pruned_acc"]) <= 0.005,
    }
    summary = {
        "machine": f"{os.cpu_count()}-core {os.uname().machine}", "profile": str(profile),
        "keras": {"dense_accuracy": round(m["dense_acc"], 4), "pruned_accuracy": round(m["pruned_acc"], 4),
                  "mask_sparsity": round(m["mask_sparsity"], 4)},
        "tflite": tflite, "int8_size_ratio_vs_dense": round(dense["bytes"] / int8["bytes"], 2),
        "agent": agent, "targets": targets, "all_targets_met": all(targets.values()),
        "wall_s": round(time.monotonic() - start, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
