"""A federation as real processes, for fault tests and ``scripts/bench_faults.py``: a Mosquitto
started with the set-up ``init-broker`` writes (TLS, a login per device, the ACL), one
``fedprune-agent`` process per device with its own connection file and data shard, and the
aggregator as a ``fedprune-aggregator`` process. Any of them can be SIGKILLed and started again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from brokers import MosquittoProcess, free_port

from fedprune.aggregator.broker_setup import BrokerFolder, init_broker
from fedprune.task import load_task

TOOL_USER = "fedprune-tools"
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
# The processes run this checkout's code, also where the installed package is another checkout's.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

TASK = """
seed = 3
[model]
factory = "fedprune.models:digits_cnn"
[data]
dataset = "digits"
[federation]
id = "faults"
rounds = {rounds}
devices_per_round = {devices}
min_devices = 2
round_timeout_s = {round_timeout_s}
max_round_retries = 2
wait_for_devices_s = 180
[training]
local_epochs = 2
learning_rate = 0.003
[pruning]
final_sparsity = 0.5
begin_round = 1
end_round = 2
leave_dense = ["logits"]
"""


def command(name: str, module: str) -> list[str]:
    """The console script of this environment, or ``python -m module`` where it is not installed."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def read_until(proc: subprocess.Popen, needle: str, timeout_s: float) -> list[str]:
    """Lines of ``proc``'s stdout up to the first that contains ``needle``; AssertionError (with the
    output so far) if it does not come within ``timeout_s`` or the process ends first."""
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.rstrip())
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; output so far:\n" + "\n".join(lines))


@dataclass
class RunRecord:
    """What ``metrics.jsonl`` says happened: one line per completed round."""

    rounds: list[int]
    accuracy: float
    rejections: dict[str, int]
    reported: list[int]
    selected: list[int]
    redelivered: int = 0  # byte-identical copies of accepted updates, over the run

    @property
    def applied_twice(self) -> list[int]:
        return sorted(r for r, n in Counter(self.rounds).items() if n > 1)



def add_tool_login(folder: BrokerFolder) -> str:
    """A login of its own (whole-federation rights, as the aggregator's) for the test tools that
    replay or fuzz updates, and its broker URL. The generated config has
    ``use_username_as_clientid``: a second connection with the aggregator's login would take over
    the aggregator's session. Call before the broker starts (it reads passwd and acl once)."""
    import secrets
    import tempfile
    from dataclasses import replace

    from fedprune.aggregator.passwords import write_password_file
    from fedprune.connection import load_connection
    from fedprune.converters.protocol import Topics

    password = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        line = write_password_file(Path(tmp) / "passwd", {TOOL_USER: password}).read_text()
    with open(folder.path / "passwd", "a") as f:
        f.write(line)
    with open(folder.path / "acl", "a") as f:
        f.write(f"\nuser {TOOL_USER}\ntopic readwrite {Topics(folder.federation).root}/#\n")
    aggregator = load_connection(folder.aggregator_connection).broker
    return replace(aggregator, username=TOOL_USER, password=password).full_url()

@dataclass
class Fleet:
    workdir: Path
    devices: list[str]
    rounds: int = 3
    round_timeout_s: float = 90  # generous: 2 shared cores, 4 TensorFlow processes
    # Logins for devices that run no agent here (an attacker with valid credentials, say).
    extra_logins: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)  # more fedprune-agent options, for every agent
    aggregator_args: list[str] = field(default_factory=list)  # more fedprune-aggregator options
    devices_per_round: int | None = None  # default: every device here
    # transport.max_payload_bytes for the task, the agents and the broker (default: the task's 1,000,000)
    max_payload_bytes: int | None = None
    folder: BrokerFolder = field(init=False)
    broker: MosquittoProcess = field(init=False)
    agents: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)
    aggregator: subprocess.Popen | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.task_path = self.workdir / "task.toml"
        text = TASK.format(rounds=self.rounds, devices=self.devices_per_round or len(self.devices),
                           round_timeout_s=self.round_timeout_s)
        if self.max_payload_bytes:
            text += f"[transport]\nmax_payload_bytes = {self.max_payload_bytes}\n"
            self.agent_args = [*self.agent_args, "--max-payload-bytes", str(self.max_payload_bytes)]
        self.task_path.write_text(text)
        task = load_task(self.task_path)
        self.folder = init_broker(self.workdir / "broker", task.federation.id, self.devices + self.extra_logins,
                                  ["localhost"], port=free_port(), bind="127.0.0.1",
                                  max_payload_bytes=task.transport.max_payload_bytes)
        self.tool_url = add_tool_login(self.folder)
        self.broker = MosquittoProcess(port=self.folder.port, base_config=self.folder.mosquitto_conf.read_text())
        self.run_dir = self.workdir / "run"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self._aggregator_runs = 0
        self.aggregator_log: Path | None = None
        from fedprune.data import load_dataset, partition

        ds = load_dataset(task.data.dataset, task.data.path, task.data.test_fraction, task.seed,
                          task.data.options)
        for device, idx in zip(self.devices, partition(ds.y_train, len(self.devices), "iid", seed=task.seed)):
            np.savez(self.workdir / f"{device}.npz", x_train=ds.x_train[idx], y_train=ds.y_train[idx])

    # --- processes ---
    def start(self) -> "Fleet":
        self.broker.start()
        for device in self.devices:
            self.start_agent(device)
        return self

    def start_agent(self, device: str) -> subprocess.Popen:
        log = open(self.logs / f"{device}.log", "ab")  # noqa: SIM115 - the child owns it
        self.agents[device] = subprocess.Popen(
            command("fedprune-agent", "fedprune.edge_agent.cli")
            + ["--connection", str(self.folder.device_connection(device)), "--data", str(self.workdir / f"{device}.npz"),
               "--state-dir", str(self.workdir / "state" / device), *self.agent_args],
            stdout=log, stderr=subprocess.STDOUT, env=ENV)
        log.close()
        return self.agents[device]

    def start_aggregator(self, resume: bool = False) -> subprocess.Popen:
        """Start ``fedprune-aggregator``; its output goes to a file of its own (a pipe nobody reads
        would fill with its warnings and block it), read by :meth:`wait_for_line`."""
        cmd = command("fedprune-aggregator", "fedprune.aggregator.cli") + [
            "--task", str(self.task_path), "--connection", str(self.folder.aggregator_connection),
            "--run-dir", str(self.run_dir), *self.aggregator_args]
        self._aggregator_runs += 1
        self.aggregator_log = self.logs / f"aggregator-{self._aggregator_runs}.log"
        with open(self.aggregator_log, "wb") as log:
            self.aggregator = subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=log,
                                               stderr=subprocess.STDOUT, env=ENV)
        return self.aggregator

    def aggregator_output(self) -> str:
        return self.aggregator_log.read_text(errors="replace")

    def wait_for_line(self, needle: str, timeout_s: float = 600) -> None:
        """Wait until the running aggregator's output has a line starting with ``needle``;
        AssertionError (with its output) if it does not come in time or the aggregator ends first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(line.startswith(needle) for line in self.aggregator_output().splitlines()):
                return
            if self.aggregator.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not seen; aggregator output:\n{self.aggregator_output()[-3000:]}")

    def finish_aggregator(self, timeout_s: float = 600) -> str:
        """Wait for the aggregator to end; its whole output. AssertionError if it failed."""
        self.aggregator.wait(timeout_s)
        out = self.aggregator_output()
        assert self.aggregator.returncode == 0, out[-3000:]
        return out

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL: no clean disconnect, no atexit, no flushed buffers."""
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def close(self) -> None:
        procs = [p for p in [*self.agents.values(), self.aggregator] if p is not None and p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.broker.close()

    def __enter__(self) -> "Fleet":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what happened ---
    def record(self) -> RunRecord:
        lines = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines() if line]
        rejections: Counter[str] = Counter()
        for rec in lines:
            rejections.update(rec.get("rejections", {}))
        return RunRecord(rounds=[rec["round"] for rec in lines], accuracy=lines[-1]["accuracy"] if lines else float("nan"),
                         rejections=dict(rejections), reported=[rec["reported"] for rec in lines],
                         selected=[rec["selected"] for rec in lines],
                         redelivered=sum(rec.get("redelivered", 0) for rec in lines))


# --- fault scenarios: each runs the aggregator to its end with one fault injected mid-round -------
# They take a started Fleet and return notes on what was done; the caller reads fleet.record().

MID_ROUND_S = 0.5  # after the "round 1" line: round 2's tasks are out, its training under way


def clean_run(fleet: Fleet) -> dict:
    fleet.start_aggregator()
    fleet.finish_aggregator()
    return {}


def device_killed(fleet: Fleet) -> dict:
    """SIGKILL one device while round 2 trains."""
    fleet.start_aggregator()
    fleet.wait_for_line("round   1")
    time.sleep(MID_ROUND_S)
    victim = fleet.devices[0]
    fleet.kill(fleet.agents[victim])
    fleet.finish_aggregator()
    return {"killed": victim, "in_round": 2}


def aggregator_killed(fleet: Fleet) -> dict:
    """SIGKILL the aggregator while round 2 trains, then start it again with --resume."""
    fleet.start_aggregator()
    fleet.wait_for_line("round   1")
    time.sleep(MID_ROUND_S)
    fleet.kill(fleet.aggregator)
    fleet.start_aggregator(resume=True)
    resumed = [line for line in fleet.finish_aggregator().splitlines() if line.startswith("round")]
    return {"killed": "aggregator", "in_round": 2, "resumed_rounds": [int(line.split()[1]) for line in resumed]}


def broker_restarted(fleet: Fleet) -> dict:
    """SIGKILL Mosquitto while round 2 trains and start it again on the same port a second later."""
    fleet.start_aggregator()
    fleet.wait_for_line("round   1")
    time.sleep(MID_ROUND_S)
    fleet.broker.kill()
    time.sleep(1.0)
    fleet.broker.start()
    fleet.finish_aggregator()
    return {"killed": "broker", "in_round": 2}


def update_replayed(fleet: Fleet) -> dict:
    """Every update is sent a second time at once (a QoS 1 redelivery or a replay)."""
    from fedprune.converters.protocol import Topics
    from fedprune.transport import MqttSession

    topics = Topics(fleet.folder.federation)
    seen: set[bytes] = set()

    def replay(topic: str, payload: bytes) -> None:
        if payload not in seen:  # it also receives its own replays
            seen.add(payload)
            session.publish(topic, payload)

    session = MqttSession(fleet.tool_url, "replayer", subscriptions=[topics.all_updates], on_message=replay,
                          max_payload_bytes=2_000_000).start()
    try:
        fleet.start_aggregator()
        fleet.finish_aggregator()
    finally:
        session.stop()
    return {"replayed": len(seen)}


SCENARIOS = {
    "clean": clean_run,
    "device killed": device_killed,
    "aggregator killed + resume": aggregator_killed,
    "broker restarted": broker_restarted,
    "update replayed": update_replayed,
}
