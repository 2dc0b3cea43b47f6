"""Values-only downlink (issue 19): a device that holds the round's masks is sent only the kept
values; the masks travel when they changed or to a device that does not hold them; older agents
(no mask digest in their presence) keep getting self-describing tasks; downlink error feedback.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedprune.aggregator.downlink import Downlink
from fedprune.aggregator.registry import DeviceRegistry, take_presence
from fedprune.converters.codec import decode_values_only, encode_values_only
from fedprune.converters.errors import CodecError
from fedprune.converters.mask_coding import mask_digest
from fedprune.converters.protocol import Presence, Topics, TrainTask, decode_task, encode_task, task_mask_digest
from fedprune.task import TransportSection

NAMES = ["d/kernel", "d/bias", "out/kernel"]
SHAPES = [(64, 32), (32,), (32, 10)]


def _model(seed: int = 0, sparsity: float = 0.9):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, 0.1, s).astype(np.float32) for s in SHAPES]
    masks = [rng.random(SHAPES[0]) > sparsity, None, rng.random(SHAPES[2]) > sparsity]
    weights = [w if m is None else w * m for w, m in zip(weights, masks)]
    return weights, masks


def _task(weights, masks, precision="float32", round_number=1) -> TrainTask:
    return TrainTask(round=round_number, attempt=1, architecture_digest="0" * 32, weights=list(weights),
                     masks=masks, deadline_s=60, uplink_precision="int8", downlink_precision=precision,
                     training={"local_epochs": 1, "batch_size": 16, "learning_rate": 0.01, "optimizer": "adam"})


@pytest.mark.parametrize("precision", ["float32", "float16", "int8", "int4"])
def test_values_only_task_decodes_against_the_held_masks_and_is_much_smaller(precision):
    weights, masks = _model()
    task = _task(weights, masks, precision)
    full = encode_task(task, NAMES)
    values = encode_task(task, NAMES, values_only=True)
    assert task_mask_digest(values, 10**6) == (mask_digest(masks), True)
    assert task_mask_digest(full, 10**6) == (mask_digest(masks), False)
    assert len(full) - len(values) >= 150  # the tensor table and the coded masks (about 200 kept of 2,368)
    a = decode_task(full, NAMES, SHAPES, 10**6)
    b = decode_task(values, NAMES, SHAPES, 10**6, held_masks=a.masks)
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(x, y)
    assert mask_digest(b.masks) == mask_digest(a.masks)
    assert b.downlink_precision == precision and b.round == task.round


def test_a_values_only_task_for_masks_the_device_does_not_hold_is_refused_by_name():
    weights, masks = _model()
    values = encode_task(_task(weights, masks), NAMES, values_only=True)
    with pytest.raises(CodecError, match="holds no masks"):  # what an agent without held masks (or an old one) meets
        decode_task(values, NAMES, SHAPES, 10**6)
    _, other = _model(seed=1)
    with pytest.raises(CodecError, match=f"values-only task for masks {mask_digest(masks)}, and this device holds"):
        decode_task(values, NAMES, SHAPES, 10**6, held_masks=other)
    # A self-describing task still decodes whatever the device holds.
    assert decode_task(encode_task(_task(weights, masks), NAMES), NAMES, SHAPES, 10**6, held_masks=other)


def test_presence_names_the_held_masks_and_an_older_agents_presence_still_decodes():
    digest = "0123456789abcdef" * 2
    new = Presence("pi-1", True, 10, mask_digest=digest)
    assert Presence.decode(new.encode()).mask_digest == digest
    assert Presence.decode(Presence("pi-1", True, 10, mask_digest="").encode()).mask_digest == ""
    old = Presence("pi-1", True, 10)  # the bytes every agent before the field sent: no key at all
    assert b"mask_digest" not in old.encode()
    assert Presence.decode(old.encode()).mask_digest is None
    with pytest.raises(CodecError, match="mask_digest"):
        Presence.decode(Presence("pi-1", True, 10, mask_digest="XYZ").encode())


def test_each_device_gets_values_only_exactly_when_it_holds_the_masks():
    weights, masks = _model()
    digest = mask_digest(masks)
    topics = Topics("default")
    registry = DeviceRegistry()
    for device, held in (("new-holds", digest), ("new-other", "f" * 32), ("new-none", ""), ("old", None)):
        take_presence(registry, topics, topics.presence(device), Presence(device, True, 10, mask_digest=held).encode())
    downlink = Downlink(TransportSection(), NAMES)
    payloads = downlink.payloads(_task(weights, masks), ["new-holds", "new-other", "new-none", "old"], registry)
    kinds = {d: task_mask_digest(p, 10**6)[1] for d, p in payloads.items()}
    assert kinds == {"new-holds": True, "new-other": False, "new-none": False, "old": False}
    # A device that answered a task holds its masks from then on; an older agent never gets values-only.
    registry.holds_masks("new-none", digest)
    registry.holds_masks("old", digest)
    payloads = downlink.payloads(_task(weights, masks, round_number=2), ["new-none", "old"], registry)
    assert task_mask_digest(payloads["new-none"], 10**6)[1] and not task_mask_digest(payloads["old"], 10**6)[1]


def test_downlink_error_feedback_cancels_the_quantization_error_over_rounds():
    """The same weights sent at int4 round after round: without feedback a device trains from the
    same rounding every time; with it the errors cancel, and the mean of what was received over
    20 rounds is within a few percent of a quantization step of the weights."""
    weights, masks = _model()
    rounds = 20

    def received(feedback: bool) -> np.ndarray:
        downlink = Downlink(TransportSection(downlink_precision="int4", error_feedback=feedback), NAMES)
        got = []
        for r in range(1, rounds + 1):
            payload = downlink.payloads(_task(weights, masks, "int4", r), ["d"], DeviceRegistry())["d"]
            got.append(decode_task(payload, NAMES, SHAPES, 10**6).weights[0])
        return np.mean(got, axis=0)

    kept = masks[0]
    plain = np.abs(received(False) - weights[0])[kept].mean()
    fed_back = np.abs(received(True) - weights[0])[kept].mean()
    step = np.abs(weights[0]).max() / 7
    assert plain > 0.15 * step  # a fixed rounding error, a quarter of a step on average
    assert fed_back < 0.1 * plain
    # Float32 is lossless: no feedback, the weights go as they are.
    downlink = Downlink(TransportSection(downlink_precision="float32"), NAMES)
    assert not downlink.feedback


def test_the_downlink_residual_survives_a_checkpoint_and_a_resume(tmp_path):
    """A run stopped after round 2 and resumed sends round 3 exactly what the uninterrupted run sends."""
    from fedprune.aggregator.checkpoint import FederationState, load_latest_checkpoint, save_checkpoint

    transport = TransportSection(downlink_precision="int4", error_feedback=True)
    rounds = [_model(seed) for seed in (1, 2, 3)]

    def send(downlink: Downlink, r: int) -> bytes:
        return downlink.payloads(_task(*rounds[r - 1], "int4", r), ["d"], DeviceRegistry())["d"]

    through = Downlink(transport, NAMES)
    expected = [send(through, r) for r in (1, 2, 3)]
    first = Downlink(transport, NAMES)
    send(first, 1), send(first, 2)
    save_checkpoint(tmp_path, FederationState(2, rounds[1][0], rounds[1][1], {}, downlink_residual=first.residual))
    resumed = Downlink(transport, NAMES)
    resumed.restore(load_latest_checkpoint(tmp_path).downlink_residual)
    assert send(resumed, 3) == expected[2]
    assert send(Downlink(transport, NAMES), 3) != expected[2]  # without the residual it differs


def test_values_only_sections_of_both_directions_agree():
    """The task's values-only body is the uplink's values-only section (protocol section 8.1)."""
    weights, masks = _model()
    section = encode_values_only(weights, masks, "int8")
    decoded = decode_values_only(section, SHAPES, masks, "int8")
    task = decode_task(encode_task(_task(weights, masks, "int8"), NAMES, values_only=True), NAMES, SHAPES, 10**6,
                       held_masks=masks)
    for a, b in zip(decoded, task.weights):
        np.testing.assert_array_equal(a, b)


def test_a_federation_sends_the_masks_only_when_they_changed(embedded_broker_url, tmp_path):
    """3 devices, the mask set once after round 1 (90 %) and fixed after: round 2's tasks carry the
    new masks, rounds 3 and 4 only the kept values (int8 downlink, with error feedback), and the
    federation still learns."""
    from fedprune.converters.frame import unpack_frame
    from fedprune.simulation.cli import run_simulation

    from federation_helpers import Spy, small_task
    from signing_helpers import content

    task = small_task(federation={"rounds": 4, "devices_per_round": 3, "min_devices": 3},
                      pruning={"final_sparsity": 0.9, "begin_round": 1, "end_round": 1, "frequency": 1},
                      transport={"downlink_precision": "int8"})
    topics = Topics(task.federation.id)
    spy = Spy(embedded_broker_url, [f"{topics.root}/device/+/task"])
    try:
        result = run_simulation(task, 3, tmp_path / "run", broker_url=embedded_broker_url, export_tflite=False)
    finally:
        spy.close()
    kinds: dict[int, set[bool]] = {}
    for _, payload in spy.on("/task"):
        if payload:
            _, header, _ = unpack_frame(content(payload), 10**8)  # the task inside its signed envelope
            kinds.setdefault(header["round"], set()).add(header.get("section_encoding") == "values-only")
    assert kinds == {1: {False}, 2: {False}, 3: {True}, 4: {True}}
    down = {r.round: r.bytes_down for r in result.rounds}
    # int8 values of 10 % of the kernels, without their Golomb-coded masks (about 0.47 bit a position): 0.65x, seen
    assert down[3] < 0.75 * down[2]
    assert result.final_accuracy > 0.6
