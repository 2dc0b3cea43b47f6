"""The live status page and TensorBoard: what they show agrees with metrics.jsonl on every round.

The page is read in a real browser (Debian's Chromium, headless) while a simulated federation
runs; TensorBoard's event files are read back with TensorBoard's own event reader."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import numpy as np
import pytest

from browser import PageReading, dump_dom, screenshot
from brokers import free_port
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
    for d in ("pi-1", "pi-2"):
        registry.update(d, True, 40, trainer="litert", runtime="ai-edge-litert 2.3.0")
    registry.update("pi-3", True, 40)  # an agent older than the presence's trainer and runtime
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
    assert (devices["pi-1"]["trainer"], devices["pi-1"]["runtime"]) == ("litert", "ai-edge-litert 2.3.0")
    assert (devices["pi-3"]["trainer"], devices["pi-3"]["runtime"]) == ("keras", "unknown")
    snap = status.snapshot()["run"]
    assert snap["progress"]["selected"] == 3 and snap["progress"]["refused"] == 1 and snap["round"] == 1
    assert "broker" not in json.dumps(status.snapshot())  # no address, no credentials


def _check_page(url: str, metrics: list[dict], devices: list[str]) -> None:
    page = PageReading(dump_dom(url))
    rounds = [m["round"] for m in metrics]
    assert page.by_id["round"]["data-completed"] == str(rounds[-1])
    for chart, names in (("chart-accuracy", ["accuracy"]), ("chart-sparsity", ["sparsity", "sparsity_all"]),
                         ("chart-bytes", ["bytes_up", "bytes_down"])):
        assert page.series(chart, "rounds") == rounds
        for name in names:
            assert page.series(chart, name) == [m[name] for m in metrics], (chart, name)
    assert sorted(page.devices) == devices
    assert all(int(row["rounds_done"]) == len(rounds) for row in page.devices.values())  # every device, every round
    assert sum(int(row["bytes_up"]) for row in page.devices.values()) == sum(m["bytes_up"] for m in metrics)
    assert sum(int(row["bytes_down"]) for row in page.devices.values()) == sum(m["bytes_down"] for m in metrics)
    assert all(row["online"] == "true" and row["last_error"] == "" for row in page.devices.values())


def _tensorboard_scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.util import tensor_util

    reader = pea.EventAccumulator(str(run_dir), size_guidance={pea.TENSORS: 0})
    reader.Reload()
    out = {}
    for tag in reader.Tags()["tensors"]:
        meta = reader.SummaryMetadata(tag)
        assert meta.plugin_data.plugin_name == "scalars" and meta.data_class == summary_pb2.DATA_CLASS_SCALAR, tag
        out[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in reader.Tensors(tag)}
    return out


def test_the_status_page_in_a_browser_and_tensorboard_agree_with_metrics_jsonl(embedded_broker_url, tmp_path):
    from fedprune.aggregator.records import RoundRecord
    from fedprune.aggregator.tensorboard_log import scalars_of
    from fedprune.simulation.cli import run_simulation

    task = small_task(training={"local_epochs": 1})
    port, run_dir = free_port(), tmp_path / "run"
    url = f"http://127.0.0.1:{port}/"
    seen = []

    def look(record):  # while the run goes: the page shows every round completed so far
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        _check_page(url, metrics, ["sim-000", "sim-001", "sim-002"])
        if record.round == 2:
            screenshot(url, tmp_path / "page.png")
        seen.append(record.round)

    run_simulation(task, 3, run_dir, broker_url=embedded_broker_url, export_tflite=False, on_round=look,
                   status_at=("127.0.0.1", port))
    assert seen == [1, 2, 3]
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = [RoundRecord(**json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    board = _tensorboard_scalars(run_dir)
    written = {tag for record in metrics for tag in scalars_of(record)}
    assert set(board) == written and {"held_out/accuracy", "sparsity/all_weights", "bytes/up",
                                      "devices/reported", "time/train_s"} <= written
    for record in metrics:
        for tag, value in scalars_of(record).items():  # as TensorBoard stores them: float32
            assert board[tag][record.round] == float(np.float32(value)), (tag, record.round)
    assert all(not math.isnan(v) for steps in board.values() for v in steps.values())
    summary = json.loads((run_dir / "summary.json").read_text())  # sparsity both ways, and what stayed dense
    assert summary["final_sparsity"] == metrics[-1].sparsity and summary["final_sparsity_all_weights"] == \
        metrics[-1].sparsity_all < metrics[-1].sparsity
    assert summary["not_pruned"] == {"logits": "Dense: left dense by pruning.leave_dense"}
