"""The live status page and TensorBoard: what they show agrees with metrics.jsonl on every round.

The page is read in a real browser (Debian's Chromium, headless) while a simulated federation
runs; TensorBoard's event files are read back with TensorBoard's own event reader."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from fedprune.aggregator.collect import RoundProgress
from fedprune.aggregator.registry import DeviceRegistry, OtherFederations
from fedprune.aggregator.run_status import RunStatus
from fedprune.aggregator.status_page import StatusPage
from federation_helpers import small_task


def _get(url: str, host: str | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_page_serves_its_own_files_and_json_read_only_on_loopback_names():
    snapshot = {"run": {"final_accuracy": float("nan")}, "devices": [], "rounds": [{"loss": float("inf")}]}
    with StatusPage(lambda: snapshot) as page:
        code, headers, body = _get(page.url)
        assert code == 200 and b'<script src="app.js">' in body and "default-src 'self'" in headers["Content-Security-Policy"]
        assert all(_get(page.url + name)[0] == 200 for name in ("app.js", "style.css"))
        code, headers, body = _get(page.url + "status.json")
        assert code == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"run": {"final_accuracy": None}, "devices": [], "rounds": [{"loss": None}]}
        assert _get(page.url + "status.json", method="POST")[0] == 501  # read-only
        assert _get(page.url + "../pyproject.toml")[0] == 404
        assert _get(page.url, host=f"attacker.example:{page.port}")[0] == 403  # DNS rebinding
        assert _get(page.url, host=f"localhost:{page.port}")[0] == 200
    with pytest.raises(OSError, match="choose another --status-port"):
        with StatusPage(lambda: {}, port=page.port) as busy, StatusPage(lambda: {}, port=busy.port):
            pass


def test_run_status_follows_attempts_devices_and_refusals():
    task = small_task()
    registry = DeviceRegistry()
    for d in ("pi-1", "pi-2", "pi-3"):
        registry.update(d, True, 40)
    others = OtherFederations(task.federation.id)
    status = RunStatus(task, registry, others, name="run-x")
    status.waiting_for_devices(3, 2, 60)
    assert status.describe().startswith(f"waiting for devices on federation '{task.federation.id}': 3 of 3 online")
    status.attempt_opened(1, 1, ["pi-1", "pi-2", "pi-3"], 1000, 60)
    status.progress(RoundProgress(1, 1, 3, 1, 0, "pi-1", 300, ""))
    status.progress(RoundProgress(1, 1, 3, 1, 1, "pi-2", 80, "device error: TrainingError: local data has 3 labels"))
    assert status.describe().startswith("round 1 attempt 1: waiting for updates from pi-3 (1 of 3 in; deadline in")
    devices = {d["device_id"]: d for d in status.snapshot()["devices"]}
    assert devices["pi-1"]["rounds_done"] == 1 and devices["pi-1"]["bytes_up"] == 300
    assert devices["pi-2"]["last_error"].startswith("device error: TrainingError") and devices["pi-2"]["rounds_done"] == 0
    assert {d["bytes_down"] for d in devices.values()} == {1000}
    assert devices["pi-3"]["trainer"] == devices["pi-3"]["runtime"] == "unknown"  # until presence carries them
    snap = status.snapshot()["run"]
    assert snap["progress"]["selected"] == 3 and snap["progress"]["refused"] == 1 and snap["round"] == 1
    assert "broker" not in json.dumps(status.snapshot())  # no address, no credentials
