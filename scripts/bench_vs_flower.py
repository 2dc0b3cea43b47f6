"""Benchmark: the same dense FedAvg task in Flower's simulation engine and in fedprune.

Same task file (examples/digits.toml by default) with pruning off and float32 updates: the same
Keras model (``fedprune.models``), the same Dirichlet partition (``fedprune.data.partition``, same
seed), the same device selection each round (``numpy.random.default_rng(seed).choice`` over the
sorted devices, as ``fedprune.aggregator.server`` draws it), the same local training (epochs, batch,
optimizer and learning rate, fresh optimizer state each round), FedAvg weighted by sample count,
evaluation of the global model on the same held-out set after each round.

- Flower: ``flwr.simulation.start_simulation`` (the Ray-backed Virtual Client Engine) with
  Flower's own ``FedAvg`` strategy and a ``SimpleClientManager`` whose ``sample`` draws the same
  devices; bytes are the serialized ``Parameters`` tensors Flower hands between server and clients.
- fedprune: ``fedprune.simulation.cli.run_simulation`` (asyncio devices, embedded MQTT broker); bytes are
  the MQTT payloads. Then the task file as it is (pruned, int8) for the bytes ratio.

Each framework runs ``--repeats`` times with seeds 0, 1, ... (run-to-run noise). Needs the
``flower`` extra (``pip install "fedprune[flower]"``: flwr with Ray). Last line JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from fedprune.task import Task, load_task  # noqa: E402  (installed: pip install -e .)


def dense(task: Task, seed: int) -> Task:
    return dataclasses.replace(
        task, seed=seed,
        pruning=dataclasses.replace(task.pruning, final_sparsity=0.0, initial_sparsity=0.0),
        transport=dataclasses.replace(task.transport, uplink_precision="float32", downlink_precision="float32"),
    )


# --- Flower ------------------------------------------------------------------------------------

def actor_trainer():
    """The one ``KerasTrainer`` of this process (a Ray actor runs many clients' ``fit`` calls: the
    model is wrapped, compiled and traced once per actor, as once per fedprune simulator process).
    Kept in ``sys.modules``, which outlives the client objects Flower makes for every call."""
    import types

    holder = sys.modules.setdefault("_fedprune_bench_actor", types.ModuleType("_fedprune_bench_actor"))
    if not hasattr(holder, "trainer"):
        from fedprune.edge_agent.trainer import KerasTrainer

        holder.trainer = KerasTrainer()
    return holder.trainer


def run_flower(task: Task, num_devices: int, actors: int, tf_threads: int | None = None) -> list[dict]:
    """Rounds of dense FedAvg in Flower's simulation engine (``actors`` Ray actors sharing the
    host's cores): accuracy, bytes, wall time. ``tf_threads``: each actor's TensorFlow thread pools
    (as ``fedprune-simulate --processes`` sizes its device processes' pools to their share of the
    cores); None leaves TensorFlow's default (the whole machine, in every actor)."""
    import flwr
    from flwr.client import NumPyClient
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.strategy import FedAvg

    from fedprune.aggregator.evaluation import HeldOutEvaluator
    from fedprune.data import load_dataset, partition
    from fedprune.keras_setup import keras
    from fedprune.models import architecture_of, build_model

    ds = load_dataset(task.data.dataset, task.data.path, task.data.test_fraction, task.seed, task.data.options)
    shards = partition(ds.y_train, num_devices, task.data.partition, task.data.alpha,
                       task.data.shards_per_device, seed=task.seed, min_samples=task.data.min_samples)
    seed = task.seed
    keras.utils.set_random_seed(seed)
    server_model = build_model(task.model.factory, ds.input_shape, ds.num_classes)
    server_model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    architecture = architecture_of(server_model)

    class DigitsClient(NumPyClient):
        """Trains with fedprune's own training step (``KerasTrainer``: the model wrapped, compiled
        and traced once per actor, the optimizer reset for every task, batches seeded by device and
        round), exactly as a simulated fedprune device does; only the transport differs."""

        def __init__(self, index: int):
            self.index = index
            self.x, self.y = ds.x_train[shards[index]], ds.y_train[shards[index]]

        def fit(self, parameters, config):
            from fedprune.aggregator.collect import train_task

            r = int(config.get("round", 1))
            weights = [np.asarray(p, np.float32) for p in parameters]
            work = train_task(task, r, 1, architecture.digest, weights, [None] * len(weights), "flower",
                              device_sparsity=None, gradient_fraction=None)
            key = np.random.SeedSequence([seed, self.index, 7, r, 1]).generate_state(1)[0]
            result = actor_trainer().train(architecture, work, self.x, self.y, seed=int(key))
            return [w + d for w, d in zip(weights, result.delta)], len(self.x), {}

    def client_fn(context):
        return DigitsClient(int(context.node_config["partition-id"])).to_client()

    class SameSelection(SimpleClientManager):
        """fedprune's draw: ``rng.choice`` over the devices in id order, one generator per run."""

        rng = np.random.default_rng(seed)

        def sample(self, num_clients, min_num_clients=None, criterion=None):
            self.wait_for(min_num_clients or num_clients)
            by_partition = sorted(self.clients.values(), key=lambda c: c.partition_id)
            chosen = self.rng.choice(len(by_partition), size=min(num_clients, len(by_partition)), replace=False)
            return [by_partition[i] for i in sorted(chosen.tolist())]

    rounds: list[dict] = []
    clock = {"t": time.monotonic()}

    evaluate = HeldOutEvaluator(server_model, ds.x_test, ds.y_test)  # fedprune's aggregator evaluates so

    def evaluate_fn(server_round, parameters, config):
        server_model.set_weights(parameters)
        loss, acc = evaluate()
        now = time.monotonic()
        if server_round > 0:
            rounds.append({"round": server_round, "accuracy": float(acc), "wall_s": now - clock["t"]})
        clock["t"] = now
        return float(loss), {"accuracy": float(acc)}

    class CountingFedAvg(FedAvg):
        """Flower's FedAvg, counting the parameter bytes that go down and come back."""

        def configure_fit(self, server_round, parameters, client_manager):
            out = super().configure_fit(server_round, parameters, client_manager)
            self._down = sum(len(t) for _, ins in out for t in ins.parameters.tensors)
            return out

        def aggregate_fit(self, server_round, results, failures):
            up = sum(len(t) for _, res in results for t in res.parameters.tensors)
            self._pending = {"bytes_down": self._down, "bytes_up": up, "reported": len(results)}
            return super().aggregate_fit(server_round, results, failures)

        def evaluate(self, server_round, parameters):
            out = super().evaluate(server_round, parameters)
            if server_round > 0:
                rounds[-1].update(self._pending)
            return out

    k = task.federation.devices_per_round
    strategy = CountingFedAvg(
        fraction_fit=k / num_devices, min_fit_clients=k, min_available_clients=num_devices, fraction_evaluate=0.0,
        min_evaluate_clients=0, evaluate_fn=evaluate_fn, on_fit_config_fn=lambda r: {"round": r},
        initial_parameters=ndarrays_to_parameters(server_model.get_weights()),
    )
    # No PYTHONPATH: fedprune is imported as installed (fedprune.aggregator, ...), which a checkout's
    # root on the path would shadow with its bare fedprune/ folder.
    env = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if tf_threads:
        env.update(TF_NUM_INTRAOP_THREADS=str(tf_threads), TF_NUM_INTEROP_THREADS=str(tf_threads))
    cpus = os.cpu_count() or 1
    flwr.simulation.start_simulation(
        client_fn=client_fn, num_clients=num_devices, config=ServerConfig(num_rounds=task.federation.rounds),
        strategy=strategy, client_manager=SameSelection(),
        client_resources={"num_cpus": max(1, cpus // actors), "num_gpus": 0.0},
        ray_init_args={"num_cpus": os.cpu_count(), "include_dashboard": False, "runtime_env": {"env_vars": env},
                       "object_store_memory": 200 * 1024 * 1024, "logging_level": logging.WARNING},
    )
    return rounds


# --- fedprune ------------------------------------------------------------------------------------

def run_ours(task: Task, num_devices: int, broker: str = "embedded", processes: int = 1) -> list[dict]:
    """``broker``: ``embedded`` (amqtt in this process), ``mosquitto`` (a private one), or a URL.
    ``processes`` > 1: ``fedprune-simulate --processes P`` (the devices in P processes of their own,
    training at once as Flower's actors do; the aggregator in the parent)."""
    keys = ("round", "accuracy", "wall_s", "bytes_down", "bytes_up", "reported")
    with tempfile.TemporaryDirectory() as tmp:
        if processes == 1:
            from fedprune.simulation.cli import run_simulation

            result = run_simulation(task, num_devices, Path(tmp) / "run", broker, export_tflite=False)
            return [{k: getattr(r, k) for k in keys} for r in result.rounds]
        from fedprune.task import task_toml

        (Path(tmp) / "task.toml").write_text(task_toml(task))
        cmd = [sys.executable, "-m", "fedprune.simulation.cli", "--task", str(Path(tmp) / "task.toml"), "--devices",
               str(num_devices), "--processes", str(processes), "--broker", broker, "--run-dir",
               str(Path(tmp) / "run"), "--no-progress"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"fedprune-simulate --processes {processes} failed ({done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")
        metrics = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        return [{k: json.loads(line)[k] for k in keys} for line in metrics if line.strip()]


def _print_rounds(name: str, rounds: list[dict]) -> None:
    print(f"{name}", flush=True)
    print("  round  accuracy  reported   bytes down     bytes up   wall s", flush=True)
    for r in rounds:
        print(f"  {r['round']:5d}  {r['accuracy']:.4f}  {r.get('reported', 0):8d}  {r.get('bytes_down', 0):11,}  "
              f"{r.get('bytes_up', 0):11,}  {r['wall_s']:7.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=ROOT / "examples" / "digits.toml")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="runs per framework, seeds 0, 1, ...")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--broker", default="embedded",
                        help="fedprune's broker: embedded (default), mosquitto (a private one), or a URL")
    parser.add_argument("--rounds", type=int, help="rounds instead of the task's")
    parser.add_argument("--devices-per-round", type=int, help="devices per round instead of the task's")
    parser.add_argument("--flower-actors", type=int, default=os.cpu_count() or 1,
                        help="Ray actors training at once, sharing the cores (default: one per core)")
    parser.add_argument("--flower-tf-threads", default="share",
                        help="TensorFlow threads in each Flower actor: 'share' (default: cores / actors, as "
                             "fedprune's device processes get), 'default' (TensorFlow's own: every core), or a number")
    parser.add_argument("--skip-pruned", action="store_true", help="leave out the run of the task as written")
    parser.add_argument("--processes", type=int, default=1,
                        help="fedprune's device processes (fedprune-simulate --processes; default 1: one process)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.flower_tf_threads == "share":
        flower_threads = max(1, (os.cpu_count() or 1) // args.flower_actors)
    elif args.flower_tf_threads == "default":
        flower_threads = None
    else:
        flower_threads = int(args.flower_tf_threads)
    base = load_task(args.task)
    fed = dataclasses.replace(base.federation, rounds=args.rounds or base.federation.rounds,
                              devices_per_round=args.devices_per_round or base.federation.devices_per_round)
    fed = dataclasses.replace(fed, min_devices=min(fed.min_devices, fed.devices_per_round))
    base = dataclasses.replace(base, federation=fed)

    out: dict = {"task": str(args.task), "devices": args.devices, "rounds": base.federation.rounds,
                 "devices_per_round": base.federation.devices_per_round, "flower_actors": args.flower_actors,
                 "broker": args.broker, "fedprune_processes": args.processes, "flower_tf_threads": flower_threads,
                 "cpus": os.cpu_count()}
    runs: dict[str, list[list[dict]]] = {"fedprune dense": [], "flower dense": []}
    for seed in range(args.repeats):
        rounds = run_ours(dense(base, seed), args.devices, args.broker, args.processes)
        _print_rounds(f"fedprune, dense FedAvg float32, seed {seed}", rounds)
        runs["fedprune dense"].append(rounds)
        if not args.skip_flower:
            rounds = run_flower(dense(base, seed), args.devices, args.flower_actors, flower_threads)
            _print_rounds(f"Flower {__import__('flwr').__version__} simulation, FedAvg, seed {seed}", rounds)
            runs["flower dense"].append(rounds)
    pruned = None if args.skip_pruned else run_ours(base, args.devices, args.broker, args.processes)
    if pruned:
        _print_rounds(f"fedprune, the task as written (pruned to {base.pruning.final_sparsity:.0%}, "
                      f"{base.transport.uplink_precision} uplink), seed {base.seed}", pruned)

    summary = {}
    for name, reps in runs.items():
        if not reps:
            continue
        finals = [r[-1]["accuracy"] for r in reps]
        summary[name] = {
            "final_accuracy": finals,
            "mean_final_accuracy": float(np.mean(finals)),
            "mean_accuracy_last_3": float(np.mean([np.mean([x["accuracy"] for x in r[-3:]]) for r in reps])),
            "bytes_up_per_round": float(np.mean([x["bytes_up"] for r in reps for x in r])),
            "bytes_down_per_round": float(np.mean([x["bytes_down"] for r in reps for x in r])),
            "wall_s_per_round": float(np.mean([x["wall_s"] for r in reps for x in r])),
            # steady state: round 1 holds Flower's actor start-up (Ray, TensorFlow in each actor)
            "wall_s_per_round_after_1": float(np.mean([x["wall_s"] for r in reps for x in r[1:]])),
            "device_rounds_per_s_after_1": float(np.mean([x["reported"] for r in reps for x in r[1:]])
                                                 / np.mean([x["wall_s"] for r in reps for x in r[1:]])),
            "accuracy_per_round": [[round(x["accuracy"], 4) for x in r] for r in reps],
        }
    ours = summary["fedprune dense"]
    if pruned:
        summary["fedprune pruned"] = {
            "final_accuracy": pruned[-1]["accuracy"],
            "bytes_up_total": sum(x["bytes_up"] for x in pruned),
            "uplink_ratio_vs_dense": ours["bytes_up_per_round"] * len(pruned) / sum(x["bytes_up"] for x in pruned),
            "downlink_ratio_vs_dense": ours["bytes_down_per_round"] * len(pruned) / sum(x["bytes_down"] for x in pruned),
        }
    if "flower dense" in summary:
        flower = summary["flower dense"]
        spread = max(np.ptp(ours["final_accuracy"]), np.ptp(flower["final_accuracy"]), 0.0)
        summary["accuracy_gap"] = ours["mean_final_accuracy"] - flower["mean_final_accuracy"]
        summary["run_to_run_spread"] = float(spread)
        summary["speedup_device_rounds_per_s"] = ours["device_rounds_per_s_after_1"] / flower["device_rounds_per_s_after_1"]
        print(f"dense FedAvg final accuracy: fedprune {ours['final_accuracy']}, Flower {flower['final_accuracy']}; "
              f"gap {summary['accuracy_gap']:+.4f}, largest spread between repeats {spread:.4f}", flush=True)
    out["summary"] = summary
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
