"""The device's protocol state without a broker or TensorFlow: messages in, messages out."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedprune.converters.protocol import Ack, Architecture, Presence, Topics, TrainTask, decode_update, encode_task
from fedprune.converters.signing import open_signed
from fedprune.edge_agent.device import DeviceSession, TrainJob, TrainResult, run_job
from signing_helpers import VERIFY_KEY, signed

SHAPES = [[6, 4], [4]]
NAMES = ["dense/kernel", "dense/bias"]
# No layers: the session checks the JSON (fedprune.architecture) but never builds it.
ARCH = Architecture(model_json='{"class_name": "Sequential", "config": {"layers": []}}', digest="d1", shapes=SHAPES,
                    names=NAMES)
TOPICS = Topics("fed")


def task_payload(round_=1, attempt=1, digest="d1", precision="float32", session="s", **kw) -> bytes:
    rng = np.random.default_rng(round_)
    mask = rng.random((6, 4)) > 0.5
    weights = [rng.normal(size=(6, 4)).astype(np.float32) * mask, np.zeros(4, np.float32)]
    task = TrainTask(round=round_, attempt=attempt, architecture_digest=digest, weights=weights, masks=[mask, None],
                     training={"local_epochs": 1, "batch_size": 4, "optimizer": "adam", "learning_rate": 0.01},
                     uplink_precision=precision, deadline_s=60.0, session=session, **kw)
    return signed(TOPICS.task("dev-1"), encode_task(task, NAMES))


class AddOne:
    """A trainer that moves every kept weight by +1 (or fails on request)."""

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, 0

    def train(self, architecture, task, x, y):
        self.calls += 1
        if self.fail:
            raise RuntimeError("out of memory")
        delta = [np.ones(s, np.float32) * (m if m is not None else 1) for s, m in zip(architecture.shapes, task.masks)]
        return TrainResult(delta, task.masks, {"loss": 0.5})


ARCH_MESSAGE = signed(TOPICS.architecture, ARCH.encode())


def opened(topic: str, payload: bytes) -> bytes:
    return open_signed(topic, payload, VERIFY_KEY, 1 << 20)


def device(**kw) -> DeviceSession:
    return DeviceSession("dev-1", 10, federation="fed", aggregator_key=VERIFY_KEY, **kw)


def test_presence_and_subscriptions():
    d = device()
    online, offline = d.presence(True), d.presence(False)
    assert online.topic == TOPICS.presence("dev-1") and online.retain and offline.retain
    assert Presence.decode(online.payload).online and not Presence.decode(offline.payload).online
    assert Presence.decode(online.payload).num_samples == 10
    assert set(d.subscriptions) == {TOPICS.architecture, TOPICS.task("dev-1"), TOPICS.ack("dev-1")}


def test_task_waits_for_its_architecture_then_runs_once():
    d = device()
    payload = task_payload()
    assert d.receive(TOPICS.task("dev-1"), payload) is None  # no architecture yet: held
    job = d.receive(TOPICS.architecture, ARCH_MESSAGE)
    assert job is not None and job.payload == opened(TOPICS.task("dev-1"), payload)
    assert d.receive(TOPICS.task("dev-1"), payload) is None  # QoS-1 redelivery: taken on once
    assert d.receive(TOPICS.task("dev-1"), task_payload(attempt=2)) is not None  # a retry is new work
    assert d.receive(TOPICS.task("dev-1"), b"") is None  # cleared retained task


def test_garbage_is_ignored_not_raised():
    d = device()
    assert d.receive(TOPICS.architecture, b"\x00junk") is None
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    assert d.receive(TOPICS.task("dev-1"), b"FPRN\x00garbage") is None
    assert d.receive(TOPICS.ack("dev-1"), b"nope") is None
    assert d.receive(TOPICS.ack("dev-1"), signed(TOPICS.ack("dev-1"), Ack(1, "dev-1", False, "stale").encode())) is None
    assert d.receive("some/other/topic", b"x") is None


def test_run_job_encodes_an_update_the_aggregator_decodes():
    d = device()
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    job = d.receive(TOPICS.task("dev-1"), task_payload(round_=3))
    message = run_job(d, job, AddOne(), np.zeros((10, 6)), np.zeros(10))
    assert message.topic == TOPICS.update("dev-1") and not message.retain
    update = decode_update(message.payload, SHAPES, job.task.masks, 1 << 20, names=NAMES,
                           device_id=TOPICS.device_from_topic(message.topic))  # the topic names the device
    assert (update.round, update.device_id, update.num_samples, update.content) == (3, "dev-1", 10, "delta")
    np.testing.assert_array_equal(update.tensors[0], job.task.masks[0].astype(np.float32))
    assert d.completed_rounds == []  # not until it is published
    d.sent(job, message)
    assert d.completed_rounds == [3]


def test_a_task_already_answered_is_answered_again_with_the_same_bytes_not_trained_again():
    """A resumed aggregator (same session) asks for the open round again; its earlier process may
    have taken the update, or a restarted broker lost it. Training again made devices train a
    round twice and the resumed aggregator count the second update as rejected."""
    d = device()
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    payload = task_payload(round_=4)
    job = d.receive(TOPICS.task("dev-1"), payload)
    assert d.receive(TOPICS.task("dev-1"), payload) is None  # still training: its update follows
    message = run_job(d, job, AddOne(), np.zeros((10, 6)), np.zeros(10))
    d.sent(job, message)
    again = d.receive(TOPICS.task("dev-1"), payload)
    assert again == message  # the very bytes sent, no new job
    assert d.completed_rounds == [4]
    assert d.receive(TOPICS.task("dev-1"), task_payload(round_=4, session="other")) is not None  # a new run's task


def test_a_training_failure_is_one_log_line_without_a_traceback(caplog):
    d = device()
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    job = d.receive(TOPICS.task("dev-1"), task_payload())
    caplog.set_level("INFO")
    run_job(d, job, AddOne(fail=True), np.zeros((10, 6)), np.zeros(10))
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == ["dev-1: training for round 1 failed: RuntimeError: out of memory; "
                                                "the aggregator is told"]
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= 20)


def test_training_failure_becomes_an_error_update():
    d = device()
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    job = d.receive(TOPICS.task("dev-1"), task_payload())
    message = run_job(d, job, AddOne(fail=True), np.zeros((10, 6)), np.zeros(10))
    update = decode_update(message.payload, SHAPES, job.task.masks, 1 << 20, names=NAMES)
    assert update.tensors is None and "out of memory" in update.error


def test_error_feedback_keeps_what_int4_lost(tmp_path):
    d = device(state_dir=tmp_path)
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    job = d.receive(TOPICS.task("dev-1"), task_payload(precision="int4", error_feedback=True))
    trainer = AddOne()
    trainer.train = lambda a, t, x, y: TrainResult(  # values int4 cannot hold exactly
        [np.linspace(0, 1, 24, dtype=np.float32).reshape(6, 4) * t.masks[0], np.zeros(4, np.float32)], t.masks, {})
    message = run_job(d, job, trainer, np.zeros((10, 6)), np.zeros(10))
    d.sent(job, message)
    assert (tmp_path / "error_feedback.npz").exists()
    residual = d.error_feedback.compensate([np.zeros((6, 4), np.float32), np.zeros(4, np.float32)], job.task.masks)
    assert np.abs(residual[0]).max() > 0  # the quantization error is carried to the next round


def test_bad_device_id_is_refused():
    with pytest.raises(ValueError, match="device id"):
        DeviceSession("a/b", 1, aggregator_key=VERIFY_KEY)


def test_clip_norm_in_the_task_bounds_the_update_on_the_device():
    from fedprune.clipping import global_norm

    d = device()
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    payload = task_payload()
    job = d.receive(TOPICS.task("dev-1"), payload)
    task = d.decode(job)
    task.training = dataclasses.replace(task.training, clip_norm=0.5)  # AddOne's delta has a norm of about 3.5
    message = run_job(d, job, AddOne(), np.zeros((10, 6)), np.zeros(10))
    update = decode_update(message.payload, SHAPES, job.task.masks, 1 << 20, names=NAMES)
    assert global_norm(update.tensors) == pytest.approx(0.5, rel=1e-5)


class Preparing(AddOne):
    """AddOne that also records ``prepare`` calls (or fails them on request)."""

    def __init__(self, fail_prepare: bool = False):
        super().__init__()
        self.prepared: list[str] = []
        self.fail_prepare = fail_prepare

    def prepare(self, architecture):
        if self.fail_prepare:
            raise RuntimeError("no memory to trace")
        self.prepared.append(architecture.digest)


def test_the_announced_architecture_is_what_a_trainer_prepares_for():
    from fedprune.edge_agent.device import prepare_trainer

    d = device()
    assert d.architecture is None
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    assert d.architecture == ARCH
    trainer = Preparing()
    prepare_trainer(trainer, d.architecture)
    assert trainer.prepared == ["d1"]
    prepare_trainer(AddOne(), d.architecture)  # a trainer without prepare: nothing to do
    prepare_trainer(Preparing(fail_prepare=True), d.architecture)  # a failed warm-up is logged, not raised
    job = d.receive(TOPICS.task("dev-1"), task_payload())
    assert run_job(d, job, trainer, np.zeros((10, 6)), np.zeros(10)) is not None  # and training still runs


def _lite_device(**kw):
    from fedprune.edge_agent.trainable_files import TrainableFiles

    return device(trainer="litert", runtime="tflite-runtime 2.14.0", trainable_files=TrainableFiles(),
                  final_model="float32", **kw)


def test_a_device_without_tensorflow_announces_it_and_takes_a_task_once_it_has_the_trainable_file():
    from fedprune.converters.model_messages import TrainableModel, encode_trainable_model

    d = _lite_device()
    presence = Presence.decode(d.presence(True).payload)
    assert (presence.trainer, presence.runtime) == ("litert", "tflite-runtime 2.14.0")
    assert {TOPICS.trainable_model, f"{TOPICS.trainable_model}/chunk/+", TOPICS.final_model("float32"),
            f"{TOPICS.final_model('float32')}/chunk/+"} <= set(d.subscriptions)
    digest = "ab" * 16
    arch = dataclasses.replace(ARCH, digest=digest)
    assert d.receive(TOPICS.architecture, signed(TOPICS.architecture, arch.encode())) is None
    assert d.receive(TOPICS.task("dev-1"), task_payload(digest=digest)) is None  # no file for it yet
    other = encode_trainable_model(TrainableModel("cd" * 16, 4, b"another architecture's file"))
    assert d.receive(TOPICS.trainable_model, signed(TOPICS.trainable_model, other)) is None  # still waiting
    assert d.receive(TOPICS.trainable_model, b"") is None  # a cleared topic
    job = d.receive(TOPICS.trainable_model,
                    signed(TOPICS.trainable_model, encode_trainable_model(TrainableModel(digest, 4, b"the file"))))
    assert job is not None and job.architecture.digest == digest
    assert d.trainable_files.get(digest).content == b"the file"


def test_the_final_model_is_handed_to_the_caller_and_a_damaged_one_is_dropped(caplog):
    from fedprune.converters.model_messages import FinalModel, encode_final_model

    d = _lite_device()
    final = FinalModel(15, "float32", 0.8, 0.95, "ab" * 16, b"tflite bytes")
    topic = TOPICS.final_model("float32")
    assert d.receive(topic, signed(topic, encode_final_model(final))) == final
    int8 = TOPICS.final_model("int8")
    assert d.receive(int8, signed(int8, encode_final_model(final))) is None  # not the precision it takes
    damaged = bytearray(encode_final_model(final))
    damaged[-8] ^= 0xFF
    assert d.receive(topic, signed(topic, bytes(damaged))) is None  # signed, but not the file its sha256 names
    assert d.receive(topic, encode_final_model(final)) is None  # unsigned
    assert d.refused_messages == 2 and "refused a message on" in caplog.text
    assert d.receive(TOPICS.final_model("float32"), b"") is None  # cleared at the start of a run
    with pytest.raises(ValueError, match="TrainableFiles"):
        device(trainer="litert")


def test_only_messages_the_aggregator_signed_for_their_topic_are_taken():
    from fedprune.converters.signing import SigningKey, sign_message

    d = device()
    arch, task = ARCH.encode(), task_payload()
    forged_key = SigningKey.from_seed(b"\x07" * 32)
    refused = [
        (TOPICS.architecture, arch),  # unsigned (what a version-1 aggregator sends)
        (TOPICS.architecture, sign_message(TOPICS.architecture, arch, forged_key)),  # another key
        (TOPICS.architecture, signed(TOPICS.task("dev-1"), arch)),  # signed for another topic
        (TOPICS.architecture, ARCH_MESSAGE[:30] + bytes([ARCH_MESSAGE[30] ^ 1]) + ARCH_MESSAGE[31:]),  # altered
        (TOPICS.task("dev-1"), signed(TOPICS.task("dev-2"), opened(TOPICS.task("dev-1"), task))),  # another's task
    ]
    for topic, payload in refused:
        assert d.receive(topic, payload) is None
    assert d.architecture is None and d.refused_messages == len(refused)
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    assert d.architecture == ARCH and d.refused_messages == len(refused)


def test_an_older_task_replayed_on_the_task_topic_is_refused_also_after_a_restart(tmp_path):
    """Each of these messages is signed by the aggregator for the device's task topic: a signature
    alone lets an older one be taken again. What the device took last decides what it refuses."""
    d = device(state_dir=tmp_path)
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    round_1, round_2 = task_payload(1, issued_us=1_000), task_payload(2, issued_us=2_000)
    assert isinstance(d.receive(TOPICS.task("dev-1"), round_1), TrainJob)
    assert isinstance(d.receive(TOPICS.task("dev-1"), round_2), TrainJob)
    assert d.receive(TOPICS.task("dev-1"), round_1) is None and d.refused_messages == 0  # seen: not trained again
    # An earlier aggregator process's task (another session), and one without an issue time: refused.
    earlier = task_payload(5, session="earlier", issued_us=1_500)
    assert d.receive(TOPICS.task("dev-1"), earlier) is None and d.refused_messages == 1
    assert d.receive(TOPICS.task("dev-1"), task_payload(3, session="x")) is None and d.refused_messages == 2
    # The newest task again (a redelivery, or a resumed aggregator re-sending it newly issued): no refusal.
    assert d.receive(TOPICS.task("dev-1"), round_2) is None and d.refused_messages == 2
    assert d.receive(TOPICS.task("dev-1"), task_payload(2, issued_us=2_500)) is None and d.refused_messages == 2
    # A restarted device (the same state folder) still refuses round 1, and takes a newer task.
    again = device(state_dir=tmp_path)
    again.receive(TOPICS.architecture, ARCH_MESSAGE)
    assert again.receive(TOPICS.task("dev-1"), round_1) is None and again.refused_messages == 1
    assert isinstance(again.receive(TOPICS.task("dev-1"), task_payload(3, issued_us=3_000)), TrainJob)
    # A device that never took a task with an issue time takes one without (an earlier aggregator).
    fresh = device()
    fresh.receive(TOPICS.architecture, ARCH_MESSAGE)
    assert isinstance(fresh.receive(TOPICS.task("dev-1"), task_payload(1)), TrainJob)


def test_a_device_given_another_aggregator_key_keeps_each_keys_times_apart(tmp_path):
    """Only the trusted key's messages open, so the times kept for one aggregator key say nothing
    about another's: a device moved to a new aggregator takes its tasks whatever the old one sent,
    and moved back, still refuses the first one's older tasks."""
    from fedprune.converters.signing import SigningKey, sign_message

    d = device(state_dir=tmp_path)
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    assert isinstance(d.receive(TOPICS.task("dev-1"), task_payload(1, issued_us=9_000)), TrainJob)
    other = SigningKey.from_seed(b"\x09" * 32)
    moved = DeviceSession("dev-1", 10, federation="fed", aggregator_key=other.public, state_dir=tmp_path)
    moved.receive(TOPICS.architecture, sign_message(TOPICS.architecture, ARCH.encode(), other))
    task = opened(TOPICS.task("dev-1"), task_payload(1, session="new", issued_us=1_000))
    assert isinstance(moved.receive(TOPICS.task("dev-1"), sign_message(TOPICS.task("dev-1"), task, other)), TrainJob)
    back = device(state_dir=tmp_path)
    back.receive(TOPICS.architecture, ARCH_MESSAGE)
    assert back.receive(TOPICS.task("dev-1"), task_payload(2, issued_us=5_000)) is None and back.refused_messages == 1
    assert isinstance(back.receive(TOPICS.task("dev-1"), task_payload(3, issued_us=9_500)), TrainJob)


def test_a_replayed_task_cannot_displace_the_task_that_waits_for_its_architecture():
    d = device()
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    assert isinstance(d.receive(TOPICS.task("dev-1"), task_payload(1, issued_us=1_000)), TrainJob)
    waiting = task_payload(2, digest="d2", issued_us=2_000)  # for an architecture not announced yet
    assert d.receive(TOPICS.task("dev-1"), waiting) is None and d.refused_messages == 0
    assert d.receive(TOPICS.task("dev-1"), task_payload(1, issued_us=1_000)) is None and d.refused_messages == 0
    assert d.receive(TOPICS.task("dev-1"), task_payload(1, attempt=2, issued_us=1_500)) is None
    assert d.refused_messages == 1  # older than round 1's: refused before it could wait in round 2's place
    d2 = Architecture(ARCH.model_json, "d2", ARCH.shapes, ARCH.names)
    job = d.receive(TOPICS.architecture, signed(TOPICS.architecture, d2.encode()))
    assert isinstance(job, TrainJob) and job.key[1] == 2


def test_an_earlier_final_model_replayed_is_refused(tmp_path):
    """The final model is installed on the device: an earlier run's, replayed on its topic, must
    not take the current one's place, also after the device restarts."""
    from fedprune.converters.model_messages import FinalModel, encode_final_model

    topic = TOPICS.final_model("float32")

    def final(round_, issued_us=None):
        return signed(topic, encode_final_model(FinalModel(round_, "float32", 0.8, 0.95, "ab" * 16, b"tflite %d" % round_,
                                                           issued_us)))

    d = _lite_device(state_dir=tmp_path)
    assert d.receive(topic, final(20, issued_us=5_000)).round == 20
    assert d.receive(topic, final(20, issued_us=5_000)).round == 20  # retained, again on a reconnect: the same
    assert d.receive(topic, final(15, issued_us=1_000)) is None and d.refused_messages == 1  # an earlier run's
    assert d.receive(topic, final(15)) is None and d.refused_messages == 2  # without an issue time
    again = _lite_device(state_dir=tmp_path)
    assert again.receive(topic, final(15, issued_us=1_000)) is None and again.refused_messages == 1
    assert again.receive(topic, final(30, issued_us=9_000)).round == 30
    # Tasks are counted apart: a task issued before the final model is not refused (it waits for
    # the trainable file this device trains with).
    again.receive(TOPICS.architecture, ARCH_MESSAGE)
    assert again.receive(TOPICS.task("dev-1"), task_payload(1, issued_us=2_000)) is None
    assert again.refused_messages == 1


def test_a_failure_text_leaves_the_device_as_one_short_line():
    d = device()
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    job = d.receive(TOPICS.task("dev-1"), task_payload())
    d.decode(job)
    update = decode_update(d.failure(job, "Traceback\nforged: line\x1b[31m" + "x" * 5000).payload, SHAPES,
                           job.task.masks, 1 << 20, names=NAMES)
    assert "\n" not in update.error and "\x1b" not in update.error and len(update.error) <= 200
    assert update.error.startswith("Traceback forged: line")


def test_an_encoding_defect_is_logged_with_its_traceback_and_the_aggregator_is_told(caplog):
    """Seen on a 32-bit board: NumPy refused an int64 array where it wanted its int32 index type,
    the exception left the agent's worker thread unread, and the agent said nothing and waited."""
    d = device()
    d.receive(TOPICS.architecture, ARCH_MESSAGE)
    job = d.receive(TOPICS.task("dev-1"), task_payload())

    def broken_step(outgoing):
        raise TypeError("Cannot cast array data from dtype('int64') to dtype('int32') according to the rule 'safe'")

    d.update_steps = [broken_step, *d.update_steps]
    caplog.set_level("INFO")
    message = run_job(d, job, AddOne(), np.zeros((10, 6)), np.zeros(10))
    update = decode_update(message.payload, SHAPES, job.task.masks, 1 << 20, names=NAMES)
    assert update.tensors is None and "TypeError" in update.error and "int32" in update.error
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is not None and "aggregator is told" in errors[0].getMessage()
