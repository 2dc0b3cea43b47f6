"""DP-FedAvg in a real federation: real TensorFlow, agents and the embedded broker."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedprune.aggregator.checkpoint import load_latest_checkpoint
from fedprune.aggregator.privacy import PrivacyAccountant, ReleasedRound
from fedprune.aggregator.server import Aggregator
from fedprune.converters.protocol import RoundAnnouncement, Topics
from federation_helpers import Spy, small_task, wire_updates
from signing_helpers import content
from fedprune.clipping import global_norm
from fedprune.data import load_dataset
from fedprune.simulation.cli import run_simulation


def test_dp_federation_clips_on_the_device_and_reports_epsilon_each_round(embedded_broker_url, tmp_path):
    clip = 0.5  # honest updates here have norms of about 5: every one is clipped
    task = small_task(federation={"rounds": 3, "devices_per_round": 3, "min_devices": 3},
                      privacy={"noise_multiplier": 1.0, "clip_norm": clip, "clip_on_device": True, "delta": 1e-4})
    topics = Topics(task.federation.id)
    spy = Spy(embedded_broker_url, [topics.architecture, topics.round, f"{topics.root}/device/+/update",
                                    f"{topics.root}/device/+/task"])
    try:
        result = run_simulation(task, 4, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    finally:
        spy.close()

    # Epsilon after every round, growing, as the accountant composes the rounds that were run.
    eps = [r.epsilon for r in result.rounds]
    assert all(e is not None for e in eps) and eps[0] < eps[1] < eps[2]
    assert all(r.selected == 3 and r.population in (3, 4) for r in result.rounds)  # 3 of those online
    released = [ReleasedRound(r.population, r.selected) for r in result.rounds]
    assert eps[-1] == pytest.approx(PrivacyAccountant(1.0, 1e-4).replay(released), rel=1e-9)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epsilon"] for rec in logged] == eps
    assert all(np.isnan(r.train_loss) for r in result.rounds)  # device-reported metrics are not released
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    privacy = summary["aggregation"]["privacy"]
    assert privacy["epsilon"] == pytest.approx(eps[-1]) and privacy["delta"] == 1e-4 and privacy["rounds"] == 3
    assert privacy["epsilon_if_draw_known"] >= privacy["epsilon"]
    assert summary["aggregation"]["strategy"] == "DPFedAvg"

    # The devices clipped before sending: every update on the wire is within the clip norm (plus the
    # int8 rounding and the error-feedback residual carried into it).
    updates = wire_updates(spy)
    assert len(updates) == 9
    for _, _, u in updates:
        assert global_norm(u.tensors) <= 1.05 * clip
    # The round announcements name no device: who was drawn stays secret.
    opened = [RoundAnnouncement.decode(content(p)) for _, p in spy.on(topics.round) if b'"open"' in p]
    assert opened and all(a.selected == [] for a in opened)

    # Noise only at kept positions: the pruned weights are exactly zero.
    state = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    for w, m in zip(state.weights, state.masks):
        if m is not None:
            assert (~m).any() and np.all(w[~m] == 0.0)

    # A resumed aggregator counts the rounds already released.
    longer = small_task(federation={"rounds": 4, "devices_per_round": 3, "min_devices": 3},
                        privacy={"noise_multiplier": 1.0, "clip_norm": clip, "clip_on_device": True, "delta": 1e-4})
    resumed = Aggregator(longer, load_dataset("digits"), embedded_broker_url, tmp_path / "run", resume=True,
                         export_tflite=False)
    assert resumed.accountant.epsilon() == pytest.approx(eps[-1], rel=1e-9)
