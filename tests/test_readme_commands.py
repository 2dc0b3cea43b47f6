"""Every command the README shows, run (issue 17): a README line can never again be untested.

``readme_commands()`` takes each command out of the README's ``bash`` blocks (a ``# or: ...``
comment counts as a command too). ``COVERAGE`` names, for each, the test that runs it;
``test_every_readme_command_has_a_test`` fails on a README command without one (add it to
``COVERAGE`` and write its test) and on a ``COVERAGE`` entry the README no longer shows.

The commands run as shown, in a folder of their own that holds the repository's ``examples/``
(so ``examples/digits.toml`` and ``runs/`` resolve as in a checkout), with ``.venv/bin`` first on
``PATH``. What a command cannot run as written is substituted, and only that: a placeholder host
(``LAPTOP``, ``hostA``) becomes a broker started for the test, ``<a dense run>`` an earlier run's
folder, ``local.npz`` a device's shard written for it, ``fedprune`` in ``pip install`` the checkout
(the package is installed from a clone, ``pip install --dry-run``). Long ones are slow-marked; a
fast variant (fewer rounds, through ``--rounds``) is allowed only beside a slow test of the
command exactly as the README shows it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.brokers import MosquittoProcess, free_port, mosquitto_available

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
NESTED = "FEDPRUNE_README_NESTED"  # set in the test suite that test_the_tests_command runs

needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")

#: README command -> the test in this file that runs it
COVERAGE = {
    'bash scripts/setup.sh && .venv/bin/fedprune-simulate --task examples/digits.toml --devices 20':
        "test_quick_start_on_a_fresh_clone",
    'bash scripts/setup.sh dev && .venv/bin/python -m pytest -m "not slow"': "test_the_tests_command_on_a_fresh_clone",
    'pip install "fedprune[aggregator]"': "test_pip_install_lines_resolve",
    'pip install "fedprune[agent-lite]"': "test_pip_install_lines_resolve",
    'pip install "fedprune[agent]"': "test_pip_install_lines_resolve",
    'fedprune-aggregator --task examples/digits.toml': "test_aggregator_and_agents_as_shown",
    'fedprune-agent --broker mqtt://LAPTOP:1883 --device-id pi-07 --data local.npz --aggregator-key ed25519:...':
        "test_aggregator_and_agents_as_shown",
    'fedprune-aggregator init-broker --out broker --federation clinic --host laptop.local --devices pi-01 pi-02':
        "test_secured_fleet_as_shown",
    'mosquitto -c broker/mosquitto.conf': "test_secured_fleet_as_shown",
    'fedprune-aggregator --task task.toml --connection broker/aggregator.toml': "test_secured_fleet_as_shown",
    'fedprune-agent --connection pi-01/connection.toml --data local.npz': "test_secured_fleet_as_shown",
    'fedprune-simulate --task examples/digits.toml --devices 20': "test_simulate_digits_as_shown",
    'fedprune-simulate --task examples/fleet.toml --devices 1000': "test_fleet_command_as_shown",
    'fedprune-simulate --task examples/digits.toml --devices 20 --compare runs/<a dense run>':
        "test_simulate_digits_as_shown",
    'fedprune-aggregator --task fleet.toml --broker mqtt://hostA:1883 --signing-key fleet.key':
        "test_several_hosts_as_shown",
    'fedprune-simulate --task fleet.toml --devices 1000 --device-ids 0-499 --no-aggregator --broker mqtt://hostA:1883 '
    '--aggregator-key fleet.pub': "test_several_hosts_as_shown",
    'fedprune-simulate --task fleet.toml --devices 1000 --device-ids 500-999 --no-aggregator --broker '
    'mqtt://hostA:1883 --aggregator-key fleet.pub': "test_several_hosts_as_shown",
}


def readme_commands(text: str | None = None) -> list[str]:
    """The commands in the README's ``bash`` blocks, in order (continuation lines joined,
    trailing comments dropped; ``# or: CMD`` gives CMD)."""
    text = (ROOT / "README.md").read_text() if text is None else text
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            line = line.strip()
            alternative = re.search(r"#\s*or:\s*(.+)$", line)
            if alternative:
                out.append(re.sub(r"\s+#.*$", "", alternative.group(1)).strip())
            command = re.sub(r"\s+#.*$", "", line).strip() if not line.startswith("#") else ""
            if command:
                out.append(command)
    return out


def test_every_readme_command_has_a_test():
    shown = readme_commands()
    missing = [c for c in shown if c not in COVERAGE]
    assert not missing, f"README commands without a test (add them to COVERAGE and test them): {missing}"
    stale = [c for c in COVERAGE if c not in shown]
    assert not stale, f"COVERAGE names commands the README no longer shows: {stale}"
    here = globals()
    assert all(callable(here.get(name)) for name in COVERAGE.values())


def test_readme_commands_are_parsed_with_comments_and_alternatives():
    text = "```bash\npip install a   # trains\n# or: pip install b  # other\n# a comment\nx \\\n  --y 1\n```"
    assert readme_commands(text) == ["pip install a", "pip install b", "x --y 1"]


# --- running them -----------------------------------------------------------------------------

def _workdir(tmp_path: Path) -> Path:
    """A folder that looks like a checkout to the commands: ``examples/`` copied into it."""
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples", work / "examples")
    return work


def _env() -> dict[str, str]:
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}:/usr/sbin",
               PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return env


def _run(command: str, cwd: Path, timeout_s: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``command`` through bash in ``cwd``; fails the test with its output when it fails."""
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, f"{command!r} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def _start(command: str, cwd: Path, log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=_env(), stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _finished_run(work: Path) -> Path:
    runs = sorted((work / "runs").iterdir())
    assert runs and (runs[-1] / "summary.json").is_file(), f"no finished run in {work / 'runs'}"
    return runs[-1]


def test_simulate_digits_as_shown(tmp_path):
    """Fast variant: both digits commands for one round (``--rounds 1``); the slow test below runs
    them as shown."""
    work = _workdir(tmp_path)
    out = _run("fedprune-simulate --task examples/digits.toml --devices 20 --rounds 1 --no-progress", work, 600)
    assert "broker: the embedded broker" in out.stdout
    first = _finished_run(work)
    _run(f"fedprune-simulate --task examples/digits.toml --devices 20 --compare {first} --rounds 1 --no-progress",
         work, 600)


@pytest.mark.slow
def test_simulate_digits_as_shown_in_full(tmp_path):
    work = _workdir(tmp_path)
    _run("fedprune-simulate --task examples/digits.toml --devices 20", work, 1800)
    first = _finished_run(work)
    _run(f"fedprune-simulate --task examples/digits.toml --devices 20 --compare runs/{first.name}", work, 1800)


@pytest.mark.slow
@needs_mosquitto
def test_fleet_command_as_shown(tmp_path):
    """1,000 devices: more than the embedded broker serves, so the simulator starts a private
    Mosquitto and says so; every round accounted for."""
    work = _workdir(tmp_path)
    out = _run("fedprune-simulate --task examples/fleet.toml --devices 1000 --no-progress", work, 3000)
    assert "broker: a private Mosquitto" in out.stdout
    # Round 1 must not wait out wait_for_devices_s for the devices that never connect (their
    # tiers' availability): it did, 300 s, and this test still passed.
    assert "devices online after" not in out.stdout + out.stderr
    import json

    records = [json.loads(line) for line in (_finished_run(work) / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 5


@pytest.mark.slow
@needs_mosquitto
def test_several_hosts_as_shown(tmp_path):
    """The three commands of "several hosts" (``hostA`` is a Mosquitto started for the test,
    ``fleet.toml`` the example's)."""
    work = _workdir(tmp_path)
    shutil.copy(work / "examples" / "fleet.toml", work / "fleet.toml")
    with MosquittoProcess() as broker:
        host = broker.url.removeprefix("mqtt://")
        commands = [c.replace("hostA:1883", host) for c in readme_commands() if "hostA" in c]
        assert len(commands) == 3
        procs = [_start(commands[0], work, tmp_path / "part0.log")]
        try:
            _printed_key(tmp_path / "part0.log")  # fleet.pub is written by then: "copy it to each host"
            procs += [_start(c, work, tmp_path / f"part{i}.log") for i, c in enumerate(commands[1:], 1)]
            assert procs[0].wait(3000) == 0, (tmp_path / "part0.log").read_text()[-4000:]
            for i, p in enumerate(procs[1:], 1):
                assert p.wait(120) == 0, (tmp_path / f"part{i}.log").read_text()[-4000:]
        finally:
            for p in procs:
                _stop(p)
    assert (_finished_run(work) / "metrics.jsonl").read_text().count("\n") == 5


def _printed_key(log: Path, timeout_s: float = 120) -> str:
    """The public key the aggregator printed at start (``--aggregator-key ed25519:...``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"--aggregator-key (ed25519:\S+)", log.read_text() if log.exists() else "")
        if found:
            return found.group(1)
        time.sleep(0.5)
    raise AssertionError(f"the aggregator printed no key within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def _write_shards(work: Path, names: list[str], seed: int = 0) -> None:
    """Each named device's shard of digits as ``<name>/local.npz``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    order = np.random.default_rng(seed).permutation(len(x))
    for name, part in zip(names, np.array_split(order, len(names))):
        (work / name).mkdir(parents=True, exist_ok=True)
        np.savez(work / name / "local.npz", x_train=x[part], y_train=digits.target[part])


@pytest.mark.slow
def test_aggregator_and_agents_as_shown(tmp_path):
    """The aggregator as shown (embedded broker on port 1883) and five agents as shown, LAPTOP
    being this host; digits needs at least five devices a round."""
    work = _workdir(tmp_path)
    names = [f"pi-0{i}" for i in range(1, 6)]
    _write_shards(work, names)
    aggregator = _start("fedprune-aggregator --task examples/digits.toml", work, tmp_path / "aggregator.log")
    agents = []
    try:
        key = _printed_key(tmp_path / "aggregator.log")  # what the README says to give the agents
        agent = next(c for c in readme_commands() if "LAPTOP" in c).replace("LAPTOP", "127.0.0.1")
        agent = agent.replace("ed25519:...", key)
        agents = [_start(agent.replace("pi-07", n).replace("local.npz", f"{n}/local.npz"), work,
                         tmp_path / f"{n}.log") for n in names]
        assert aggregator.wait(3000) == 0, (tmp_path / "aggregator.log").read_text()[-4000:]
    finally:
        for p in [aggregator, *agents]:
            _stop(p)
    assert (_finished_run(work) / "metrics.jsonl").read_text().count("\n") == 15


@pytest.mark.slow
@needs_mosquitto
def test_secured_fleet_as_shown(tmp_path):
    """init-broker, Mosquitto with its config, the aggregator and the devices with their
    connection files. ``laptop.local`` becomes ``localhost`` (the name the certificate is made
    for must resolve here) and init-broker's port a free one; task.toml is a two-device, one-round
    digits task of federation ``clinic``."""
    work = _workdir(tmp_path)
    shown = [c for c in readme_commands() if "clinic" in c or "broker/" in c or "pi-01/" in c]
    init, mosquitto, aggregator, agent = shown
    port = free_port()
    _run(init.replace("laptop.local", "localhost") + f" --port {port}", work, 300)
    (work / "task.toml").write_text((ROOT / "examples" / "digits.toml").read_text()
                                    .replace('id = "default"', 'id = "clinic"'))
    _set(work / "task.toml", {"rounds": "1", "devices_per_round": "2", "min_devices": "2", "end_round": "1",
                              "begin_round": "1"})
    _write_shards(work, ["pi-01", "pi-02"])
    for name in ("pi-01", "pi-02"):  # "copied to the device": each device's folder beside its data
        shutil.copytree(work / "broker" / "devices" / name, work / name, dirs_exist_ok=True)
    procs = [_start(mosquitto, work, tmp_path / "mosquitto.log")]  # _env() has /usr/sbin on PATH
    try:
        time.sleep(1)
        procs.append(_start(aggregator, work, tmp_path / "aggregator.log"))
        for n in ("pi-01", "pi-02"):
            procs.append(_start(agent.replace("pi-01", n).replace("local.npz", f"{n}/local.npz"), work,
                                tmp_path / f"{n}.log"))
        assert procs[1].wait(900) == 0, (tmp_path / "aggregator.log").read_text()[-4000:]
    finally:
        for p in reversed(procs):
            _stop(p)
    assert (_finished_run(work) / "metrics.jsonl").read_text().count("\n") == 1


def _set(path: Path, values: dict[str, str]) -> None:
    text = path.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n, f"{key} not in {path}"
    path.write_text(text)


@pytest.mark.slow
def test_pip_install_lines_resolve(tmp_path):
    """Each ``pip install "fedprune[EXTRA]"`` line, from the checkout (``pip install --dry-run``)."""
    for command in (c for c in readme_commands() if c.startswith("pip install")):
        extra = re.search(r"\[(.+)\]", command).group(1)
        _run(f'"{sys.executable}" -m pip install --dry-run "{ROOT}[{extra}]"', tmp_path, 900)


def _fresh_clone(tmp_path: Path) -> Path:
    """A clone of this checkout's HEAD, whose .venv sees this venv's packages (so that setup.sh
    installs fedprune itself, not TensorFlow again)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["python3", "-m", "venv", str(clone / ".venv")], check=True)
    site = next((clone / ".venv" / "lib").glob("python3*/site-packages"))
    ours = next((VENV_BIN.parent / "lib").glob("python3*/site-packages"))
    (site / "zz_fedprune_venv.pth").write_text(f"{ours}\n")
    return clone


@pytest.mark.slow
def test_quick_start_on_a_fresh_clone(tmp_path):
    clone = _fresh_clone(tmp_path)
    out = _run(next(c for c in readme_commands() if c.startswith("bash scripts/setup.sh &&")), clone, 3000)
    assert "broker: the embedded broker" in out.stdout and "report:" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(NESTED) == "1", reason="already inside the README's test command")
def test_the_tests_command_on_a_fresh_clone(tmp_path):
    """The whole fast suite, as the README runs it, in a fresh clone (this test skips itself there)."""
    clone = _fresh_clone(tmp_path)
    command = next(c for c in readme_commands() if "pytest" in c)
    _run(command, clone, 7200, env={**_env(), NESTED: "1"})
