"""Benchmark: one local round by the Keras trainer and by the LiteRT trainer (no TensorFlow), from
the same weights on the same device shard.

    .venv/bin/python scripts/bench_litert_trainer.py                       # digits CNN and MNIST-1D CNN
    .venv/bin/python scripts/bench_litert_trainer.py --models digits --batch-size 32
    .venv/bin/python scripts/bench_litert_trainer.py --venv-size           # + a device venv's size on disk

Per model (the example task file's model, data and training settings; ``--batch-size`` and
``--epochs`` override them):

- global weights: the model trained centrally with Keras for a few epochs, then its kernels but
  conv1 and the logits (for the digits CNN: conv2 and dense1, 99 % of the weights) pruned to 90 %
  by magnitude, as a global model mid-federation;
- the shard: device 0 of 20 (the example's partition);
- each trainer in a process of its own, ``--rounds`` rounds from the same task (shuffles differ),
  the two processes taking turns round by round (this machine's other load comes and goes over
  seconds): seconds per round (the median of all but the first, and the first with its set-up
  apart: Keras' ``prepare`` traces the step, LiteRT loads the file), the process's peak RSS
  (VmHWM), whether TensorFlow was imported, and each round's held-out accuracy (evaluated here,
  by one Keras model);
- the trainable file: build seconds and bytes (raw and zstd-compressed).

``--venv-size`` creates a venv under /tmp with only numpy, ai-edge-litert, paho-mqtt and zstandard
(the versions installed here, from the package index), measures it and removes it.

Targets (issue 15): LiteRT's round at most 2x Keras's; LiteRT's process at most 120 MB; held-out
accuracy within noise (the means within 2 standard deviations of the rounds, or 1 point); the
device venv at most 250 MB. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402  (no TensorFlow at module level: the LiteRT child imports this file)

EXAMPLES = {"digits": ROOT / "examples" / "digits.toml", "mnist1d": ROOT / "examples" / "mnist1d.toml"}
SPARSITY = 0.9
LEAVE_DENSE = ("conv1", "logits")
DEVICES = 20
PRETRAIN_EPOCHS = 3
DEVICE_PACKAGES = ("numpy", "ai-edge-litert", "paho-mqtt", "zstandard")


# --- the children: one trainer each, nothing else -------------------------------------------------

def run_child(trainer_kind: str, folder: Path) -> None:
    """Serve rounds of the job in ``folder``: a line "round" on stdin trains one (its delta to a
    file, its seconds back as a JSON line); at the end of input, the process's figures."""
    from fedprune.edge_agent import jobfiles
    from fedprune.edge_agent.budgets import peak_rss_mb

    arch, task, spec = jobfiles.read_job(folder)
    data = np.load(spec.data_path)
    start = time.perf_counter()
    if trainer_kind == "litert":
        from fedprune.edge_agent.litert_trainer import LiteRTTrainer

        trainer = LiteRTTrainer((folder / "trainable.tflite").read_bytes(), seed=0)
        runtime = trainer.runtime
    else:
        from fedprune.edge_agent.trainer import KerasTrainer
        from fedprune.keras_setup import keras, tf

        keras.utils.set_random_seed(0)
        trainer = KerasTrainer()
        trainer.prepare(arch)
        runtime = f"tensorflow {tf.__version__}"
    print(json.dumps({"setup_s": time.perf_counter() - start, "runtime": runtime}), flush=True)
    for r, _ in enumerate(sys.stdin):
        start = time.perf_counter()
        result = trainer.train(arch, task, data["x"], data["y"])
        seconds = time.perf_counter() - start
        np.savez(folder / f"delta_{trainer_kind}_{r}.npz", *result.delta)  # not kept: the peak RSS is the trainer's
        print(json.dumps({"round_s": seconds}), flush=True)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "tensorflow_loaded": "tensorflow" in sys.modules}), flush=True)


def interleaved_rounds(folder: Path, rounds: int) -> dict[str, dict]:
    """Both trainers' children, one round each in turn, so that both see the same machine (the
    load of other processes comes and goes over seconds)."""
    children = {kind: subprocess.Popen([sys.executable, __file__, "--child", kind, str(folder)], cwd=ROOT,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for kind in ("keras", "litert")}
    try:
        out = {kind: _reply(child) for kind, child in children.items()}
        for kind in out:
            out[kind]["round_s"] = []
        for _ in range(rounds):
            for kind, child in children.items():
                child.stdin.write("round\n")
                child.stdin.flush()
                out[kind]["round_s"].append(_reply(child)["round_s"])
        for kind, child in children.items():
            child.stdin.close()
            out[kind].update(_reply(child))
            if child.wait(timeout=120) != 0:
                raise RuntimeError(f"the {kind} trainer's process exited with {child.returncode}")
        return out
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()


def _reply(child: subprocess.Popen) -> dict:
    """The child's next JSON line (a library may print other lines)."""
    for line in child.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"a trainer's process ended early (exit {child.wait()}); see its stderr above")


# --- the parent -----------------------------------------------------------------------------------

def global_model(name: str):
    """The example's model trained centrally for a few epochs, then pruned; its data and task."""
    from fedprune.data import load_dataset, partition
    from fedprune.keras_setup import keras
    from fedprune.models import build_model, full_masks, get_layer_weights, set_layer_weights
    from fedprune.pruning.masks import prune_to_sparsity
    from fedprune.task import load_task

    task_file = load_task(EXAMPLES[name])
    ds = load_dataset(task_file.data.dataset, test_fraction=task_file.data.test_fraction, seed=task_file.seed)
    keras.utils.set_random_seed(task_file.seed)
    model = build_model(task_file.model.factory, ds.input_shape, ds.num_classes)
    model.compile(optimizer=keras.optimizers.Adam(task_file.training.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ds.x_train, ds.y_train, epochs=PRETRAIN_EPOCHS, batch_size=32, verbose=0)
    weights, masks = prune_to_sparsity(get_layer_weights(model), full_masks(model, LEAVE_DENSE), SPARSITY)
    set_layer_weights(model, weights)
    shard = partition(ds.y_train, DEVICES, task_file.data.partition, alpha=task_file.data.alpha,
                      seed=task_file.seed)[0]
    return model, masks, ds, shard, task_file.training


def accuracy(model, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    from fedprune.models import set_layer_weights

    set_layer_weights(model, weights)
    return float(np.mean(model.predict(x, verbose=0, batch_size=256).argmax(-1) == y))


def bench_model(name: str, rounds: int, batch_size: int | None, epochs: int | None, work: Path) -> dict:
    import zstandard

    from fedprune.converters.protocol import TrainTask
    from fedprune.converters.trainable_tflite import build_trainable_tflite
    from fedprune.edge_agent import jobfiles
    from fedprune.models import architecture_of, get_layer_weights

    model, masks, ds, shard, training = global_model(name)
    settings = {"local_epochs": epochs or training.local_epochs, "batch_size": batch_size or training.batch_size,
                "optimizer": training.optimizer, "learning_rate": training.learning_rate}
    arch, weights = architecture_of(model), get_layer_weights(model)
    task = TrainTask(round=1, attempt=1, architecture_digest=arch.digest, weights=weights, masks=masks,
                     training=settings, uplink_precision="float32", deadline_s=600)
    start = time.perf_counter()
    trainable = build_trainable_tflite(model, [m is not None for m in masks], settings["batch_size"])
    build_s = time.perf_counter() - start

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainable.tflite").write_bytes(trainable)
    np.savez(folder / "shard.npz", x=ds.x_train[shard], y=ds.y_train[shard])
    jobfiles.write_job(folder, arch, task, jobfiles.JobSpec(str(folder / "shard.npz"), "off", "", os.getpid()))
    out: dict = {"model": name, "shard_samples": int(len(shard)), "training": settings,
                 "masked_sparsity": SPARSITY, "masked_layers": "all Dense/Conv kernels but " + ", ".join(LEAVE_DENSE),
                 "global_accuracy": round(accuracy(model, weights, ds.x_test, ds.y_test), 4),
                 "trainable_file": {"build_s": round(build_s, 2), "bytes": len(trainable),
                                    "zstd_bytes": len(zstandard.ZstdCompressor(level=10).compress(trainable))}}
    children = interleaved_rounds(folder, rounds)
    for kind, child in children.items():
        accuracies = []
        for r in range(rounds):
            delta = np.load(folder / f"delta_{kind}_{r}.npz")
            accuracies.append(accuracy(model, [w + delta[f"arr_{i}"] for i, w in enumerate(weights)],
                                       ds.x_test, ds.y_test))
        steady = child["round_s"][1:] or child["round_s"]
        out[kind] = {"runtime": child["runtime"], "setup_s": round(child["setup_s"], 2),
                     "first_round_s": round(child["round_s"][0], 3), "round_s": round(statistics.median(steady), 3),
                     "rounds": rounds, "process_peak_rss_mb": round(child["peak_rss_mb"], 1),
                     "tensorflow_loaded": child["tensorflow_loaded"],
                     "accuracy_mean": round(statistics.mean(accuracies), 4),
                     "accuracy_sd": round(statistics.stdev(accuracies), 4) if rounds > 1 else 0.0}
        print(f"{name} {kind}: {out[kind]}", flush=True)
    keras_, lite = out["keras"], out["litert"]
    noise = max(2 * max(keras_["accuracy_sd"], lite["accuracy_sd"]), 0.01)
    # the median of the rounds' ratios, each pair run back to back
    ratios = [a / b for a, b in zip(children["litert"]["round_s"][1:], children["keras"]["round_s"][1:])]
    out["litert_over_keras_round_time"] = round(statistics.median(ratios or [lite["round_s"] / keras_["round_s"]]), 2)
    out["targets"] = {"round_at_most_2x_keras": out["litert_over_keras_round_time"] <= 2,
                      "litert_process_at_most_120mb": lite["process_peak_rss_mb"] <= 120,
                      "no_tensorflow_in_litert_process": not lite["tensorflow_loaded"],
                      "accuracy_within_noise": abs(lite["accuracy_mean"] - keras_["accuracy_mean"]) <= noise}
    return out


def device_venv_size() -> dict:
    """A venv with only the device packages (this environment's versions), measured, removed."""
    from importlib.metadata import version

    pins = [f"{p}=={version(p)}" for p in DEVICE_PACKAGES]
    folder = Path(tempfile.mkdtemp(prefix="fedprune-device-venv-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", "--only-binary=:all:"]
        subprocess.run([*pip, *pins], check=True)
        site = next((folder / "lib").glob("python*/site-packages"))
        sizes = {entry.name: _bytes(entry) for entry in site.iterdir()}
        packaging = sum(v for k, v in sizes.items() if k.split("-")[0] in ("pip", "setuptools", "_distutils_hack"))
        return {"packages": pins, "venv_mb": round(_bytes(folder) / 1e6, 1),
                "venv_without_pip_mb": round((_bytes(folder) - packaging) / 1e6, 1),
                "largest_mb": {k: round(v / 1e6, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:5]}}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _bytes(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(EXAMPLES), default=["digits", "mnist1d"])
    parser.add_argument("--rounds", type=int, default=15, help="rounds per trainer, from the same task (default 15)")
    parser.add_argument("--batch-size", type=int, help="instead of the example's batch size")
    parser.add_argument("--epochs", type=int, help="instead of the example's local epochs")
    parser.add_argument("--venv-size", action="store_true", help="also build and measure a device venv")
    parser.add_argument("--child", nargs=2, metavar=("TRAINER", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], Path(args.child[1]))
        return 0
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-litert-") as work:
        results = [bench_model(m, args.rounds, args.batch_size, args.epochs, Path(work)) for m in args.models]
    summary: dict = {"machine": f"{os.cpu_count()}-core {os.uname().machine}", "models": results}
    targets = {f"{r['model']}_{k}": v for r in results for k, v in r["targets"].items()}
    if args.venv_size:
        summary["device_venv"] = device_venv_size()
        targets["device_venv_at_most_250mb"] = summary["device_venv"]["venv_mb"] <= 250
    summary.update(targets=targets, all_targets_met=all(targets.values()), wall_s=round(time.monotonic() - start, 1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
