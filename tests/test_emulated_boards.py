"""The agent on emulated Raspberry Pi OS boards, 64-bit and 32-bit (scripts/emulate_boards.py).

A Debian Bookworm arm64 or armhf userland under qemu-user, the device extras installed from the
board's wheels (armhf: with Debian's NumPy 1.24, whose indices are 32-bit: protocol version 4's
encoder failed there and nowhere else):
(a) ``fedprune-agent predict`` gives the same classes as on x86_64 for the sparse float32 and int8
models; (b) the long-lived agent, training without TensorFlow, completes rounds of a federation
whose aggregator and Mosquitto run on the host. Slow: minutes the first time (downloads), then
the userland and wheels come from the cache (``FEDPRUNE_BOARDS_CACHE``, default
/work/boards-cache).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "emulate_boards.py"
pytestmark = pytest.mark.slow


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
        return True
    except OSError:
        return False


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "emulated boards need Linux (qemu-user)"
    is_root = os.geteuid() == 0
    if shutil.which("qemu-aarch64-static") is None and not is_root:
        return "qemu-user-static is missing (apt-get install qemu-user-static), and not root to install it"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "the userland is built from Debian's packages: needs apt-get and dpkg-deb"
    if not _reachable("pypi.org", 443):
        return "pypi.org is not reachable: the board's wheels come from PyPI"
    cache = Path(os.environ.get("FEDPRUNE_BOARDS_CACHE", "/work/boards-cache"))
    if not (cache / "arm64" / "root" / ".fedprune-root.json").is_file() and not _reachable("deb.debian.org", 80):
        return "deb.debian.org is not reachable and no arm64 userland is cached"
    if shutil.which("mosquitto") is None and not os.access("/usr/sbin/mosquitto", os.X_OK) and not is_root:
        return "mosquitto is missing (apt-get install mosquitto), and not root to install it"
    return None


MACHINE = {"arm64": "aarch64", "armhf": "armv7l"}


@pytest.fixture(scope="module", params=sorted(MACHINE))
def board_figures(request):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    name = request.param
    proc = subprocess.run([sys.executable, str(SCRIPT), "--board", name, "--stage", "predict,agent-lite",
                           "--rounds", "2"], capture_output=True, text=True, timeout=3600, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-4000:]}"
    figures = json.loads(lines[-1])
    board = figures["boards"][name]
    board["_stderr"] = proc.stderr[-4000:]
    assert "error" not in board, board.get("error")
    assert board["python"]["machine"] == MACHINE[name]
    return board


def test_predict_on_the_board_agrees_with_x86_64(board_figures):
    predict = board_figures["predict"]
    for precision in ("float32", "int8"):
        assert predict[precision]["samples"] > 300
        assert predict[precision]["agreement"] >= 0.99, predict[precision]
    assert predict["ok"]


def test_tensorflow_free_agent_completes_rounds_on_the_board(board_figures):
    stage = board_figures["agent-lite"]
    assert "skipped" not in stage, stage["skipped"]  # the TensorFlow-free trainer (issue 15) must exist
    assert stage["ok"], json.dumps(stage, indent=1)
    assert stage["rounds_completed"] >= 2
    site = board_figures["sites"]["site-agent-lite"]
    assert not any(name.startswith("tensorflow") for name in site["installed"])  # no TensorFlow on the board
