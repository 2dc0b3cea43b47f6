"""Tests for fedprune.task: the TOML task file and its validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedprune.pruning.schedules import PolynomialDecay
from fedprune.task import Task, TaskError, load_task, parse_task

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits.toml"


def write(tmp_path: Path, text: str, name: str = "task.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def edit(old: str, new: str) -> str:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert old in text, old
    return text.replace(old, new, 1)


def test_example_task_loads():
    t = load_task(EXAMPLE)
    assert isinstance(t, Task)
    assert t.source == str(EXAMPLE)
    assert t.seed == 0
    assert t.model.factory == "fedprune.models:digits_cnn"
    assert (t.data.dataset, t.data.partition, t.data.alpha, t.data.test_fraction) == (
        "digits", "dirichlet", 1.0, 0.2)
    assert (t.federation.rounds, t.federation.devices_per_round, t.federation.min_devices) == (15, 10, 5)
    assert isinstance(t.federation.round_timeout_s, float)  # TOML int coerced to float
    assert (t.training.local_epochs, t.training.optimizer, t.training.learning_rate) == (2, "adam", 0.002)
    assert t.pruning.enabled and t.pruning.leave_dense == ("logits",)
    assert t.pruning.schedule_object() == PolynomialDecay(0.0, 0.8, 2, 10, 3.0, 2)
    assert t.transport.uplink_precision == "int8"
    assert t.transport.max_payload_bytes == 1_000_000  # default


def test_empty_task_uses_defaults(tmp_path):
    t = load_task(write(tmp_path, ""))
    assert t == Task(source=str(tmp_path / "task.toml"))
    assert not t.pruning.enabled


def test_relative_npz_path_resolved_against_task_folder(tmp_path):
    t = load_task(write(tmp_path, '[data]\ndataset = "npz"\npath = "d/mine.npz"\n'))
    assert Path(t.data.path) == tmp_path / "d" / "mine.npz"
    t = load_task(write(tmp_path, '[data]\ndataset = "npz"\npath = "/abs/mine.npz"\n'))
    assert t.data.path == "/abs/mine.npz"


BAD = [
    # (old text in digits.toml, new text, the key the message must name)
    ("seed = 0", "seed = 0\nsede = 1", "sede"),
    ("seed = 0", 'seed = "zero"', "seed"),
    ("alpha = 1.0", "alpha = 1.0\nalpah = 2.0", "data.alpah"),
    ("rounds = 15", 'rounds = "fifteen"', "federation.rounds"),
    ("rounds = 15", "rounds = 15.0", "federation.rounds"),
    ("rounds = 15", "rounds = true", "federation.rounds"),
    ("learning_rate = 0.002", 'learning_rate = "fast"', "training.learning_rate"),
    ("learning_rate = 0.002", "learning_rate = true", "training.learning_rate"),
    ('leave_dense = ["logits"]', 'leave_dense = "logits"', "pruning.leave_dense"),
    ('leave_dense = ["logits"]', "leave_dense = [1, 2]", "pruning.leave_dense"),
    ('factory = "fedprune.models:digits_cnn"', "factory = 3", "model.factory"),
    ('factory = "fedprune.models:digits_cnn"', 'factory = "no_colon"', "model.factory"),
    # code a task names must be the user's own: refused by form, before anything is imported
    ('factory = "fedprune.models:digits_cnn"', 'factory = "os:system"', "model.factory 'os:system' names Python's"),
    ('factory = "fedprune.models:digits_cnn"', 'factory = "builtins:exec"', "model.factory"),
    ('factory = "fedprune.models:digits_cnn"', 'factory = "subprocess:run"', "model.factory"),
    ('factory = "fedprune.models:digits_cnn"', 'factory = "fedprune.models:_inner"', "private"),
    ('factory = "fedprune.models:digits_cnn"', 'factory = "a.b:c; rm -rf /"', "model.factory"),
    ("final_sparsity = 0.8", "final_sparsity = 1.5", "pruning.final_sparsity"),
    ("final_sparsity = 0.8", "final_sparsity = 1.0", "pruning.final_sparsity"),
    ("initial_sparsity = 0.0", "initial_sparsity = -0.1", "pruning.initial_sparsity"),
    ("initial_sparsity = 0.0", "initial_sparsity = 0.9", "pruning.final_sparsity"),
    ("begin_round = 2", "begin_round = -1", "pruning.begin_round"),
    ("begin_round = 2", "begin_round = 11", "pruning.end_round"),
    ("frequency = 2", "frequency = 0", "pruning.frequency"),
    ("frequency = 2", "frequency = 2\nscope = \"global\"\nglobal_floor = 2.0", "pruning.global_floor"),
    ("frequency = 2", "frequency = 2\nglobal_floor = 0.2", "pruning.global_floor applies to scope = 'global'"),
    ("frequency = 2", 'frequency = 2\nregrowth_decay = "linear"', "pruning.regrowth_decay"),
    ("learning_rate = 0.002", "learning_rate = 0.002\ndecay_begin_round = 0", "training.decay_begin_round"),
    ("learning_rate = 0.002", "learning_rate = 0.002\ndecay_begin_round = 2.5", "training.decay_begin_round"),
    ("end_round = 10", "end_round = 16", "pruning.end_round"),
    ("min_devices = 5", "min_devices = 11", "federation.min_devices"),
    ("min_devices = 5", "min_devices = 0", "federation.min_devices"),
    ("rounds = 15", "rounds = 0", "federation.rounds"),
    ('id = "default"', 'id = "a/b"', "federation.id"),
    ('id = "default"', 'id = ""', "federation.id"),
    ('id = "default"', 'id = "clinic\\nnext"', "federation.id"),
    ('id = "default"', 'id = "' + 'x' * 129 + '"', "federation.id"),
    ("devices_per_round = 10", "devices_per_round = 10000000", "federation.devices_per_round"),
    ("devices_per_round = 10", "devices_per_round = 1e7", "federation.devices_per_round"),
    ("rounds = 15", "rounds = 100000000000000000000", "federation.rounds"),
    ("round_timeout_s = 120", "round_timeout_s = 0", "federation.round_timeout_s"),
    ("round_timeout_s = 120", "round_timeout_s = 120\nmax_round_retries = -1", "federation.max_round_retries"),
    ('optimizer = "adam"', 'optimizer = "rmsprop"', "training.optimizer"),
    ("local_epochs = 2", "local_epochs = 0", "training.local_epochs"),
    ("batch_size = 16", "batch_size = 0", "training.batch_size"),
    ("learning_rate = 0.002", "learning_rate = 0", "training.learning_rate"),
    ('dataset = "digits"', 'dataset = "npz"', "data.path"),
    ('dataset = "digits"', 'dataset = "mnist"', "data.dataset"),
    ('partition = "dirichlet"', 'partition = "random"', "data.partition"),
    ("test_fraction = 0.2", "test_fraction = 1.0", "data.test_fraction"),
    ("test_fraction = 0.2", "test_fraction = 0", "data.test_fraction"),
    ("test_fraction = 0.2", "test_fraction = nan", "data.test_fraction"),
    ("alpha = 1.0", "alpha = 0.0", "data.alpha"),
    ("alpha = 1.0", "alpha = 1.0\nshards_per_device = 0", "data.shards_per_device"),
    ('uplink_precision = "int8"', 'uplink_precision = "int3"', "transport.uplink_precision"),
    ('downlink_precision = "float32"', 'downlink_precision = "float32"\nmax_payload_bytes = 100',
     "transport.max_payload_bytes"),
]


@pytest.mark.parametrize("old,new,key", BAD, ids=[f"{i:02d}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_values_raise_task_error_naming_the_key(tmp_path, old, new, key):
    path = write(tmp_path, edit(old, new))
    with pytest.raises(TaskError) as info:
        load_task(path)
    msg = str(info.value)
    assert key in msg, msg
    assert str(path) in msg  # and the file


def test_a_factory_must_be_a_function_of_its_own_module_and_failures_are_one_line():
    from fedprune.models import build_model, load_factory

    with pytest.raises(ValueError, match="must be a function defined in fedprune.models"):
        load_factory("fedprune.models:PRUNABLE_LAYER_TYPES")
    with pytest.raises(ValueError, match="must be a function defined in fedprune.models"):
        load_factory("fedprune.models:Callable")  # imported there from typing
    with pytest.raises(ValueError, match="cannot import module 'no_such_package.models'"):
        load_factory("no_such_package.models:f")
    with pytest.raises(ValueError, match="has no function 'nothing'"):
        load_factory("fedprune.models:nothing")
    with pytest.raises(ValueError, match=r"model.factory 'fedprune.models:full_masks' failed: \w+Error") as info:
        build_model("fedprune.models:full_masks", (8, 8, 1), 10)
    assert "\n" not in str(info.value)


def test_section_that_is_not_a_table(tmp_path):
    with pytest.raises(TaskError, match="'pruning' must be a table"):
        load_task(write(tmp_path, "pruning = 0.5\n"))


def test_pruning_disabled_allows_end_round_after_last_round(tmp_path):
    # final_sparsity 0 = dense FedAvg: the schedule never matters
    t = load_task(write(tmp_path, "[federation]\nrounds = 3\n[pruning]\nend_round = 9\n"))
    assert not t.pruning.enabled


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[pruning\nfinal_sparsity = 0.5\n")
    with pytest.raises(TaskError, match="not valid TOML") as info:
        load_task(path)
    assert str(path) in str(info.value)
    path = write(tmp_path, "[model]\nfactory = 'a:b'\n[model]\nfactory = 'c:d'\n", "dup.toml")
    with pytest.raises(TaskError, match="not valid TOML"):
        load_task(path)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(TaskError, match="not found") as info:
        load_task(path)
    assert str(path) in str(info.value)


def test_non_utf8_file_raises_task_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(EXAMPLE.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(TaskError):
        load_task(path)


NON_FINITE_OR_NEGATIVE = [
    ("frequency = 2", "frequency = 2\npower = -1.0", "pruning.power"),
    ("frequency = 2", "frequency = 2\npower = nan", "pruning.power"),
    ("alpha = 1.0", "alpha = nan", "data.alpha"),
    ("learning_rate = 0.002", "learning_rate = nan", "training.learning_rate"),
    ("round_timeout_s = 120", "round_timeout_s = nan", "federation.round_timeout_s"),
]


@pytest.mark.parametrize("old,new,key", NON_FINITE_OR_NEGATIVE, ids=["power=-1", "power=nan", "alpha=nan", "learning_rate=nan", "round_timeout_s=nan"])
def test_non_finite_and_negative_values_are_rejected(tmp_path, old, new, key):
    path = write(tmp_path, edit(old, new))
    with pytest.raises(TaskError, match=key.replace(".", r"\.")):
        load_task(path)


def test_parse_task_without_file():
    t = parse_task({"seed": 3, "federation": {"rounds": 4, "devices_per_round": 2, "min_devices": 2}})
    assert t.seed == 3 and t.federation.rounds == 4 and t.source == ""
    with pytest.raises(TaskError, match="source"):
        parse_task({"source": "x"})


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_task_loads_and_names_a_model_factory(path):
    from fedprune.models import load_factory

    t = load_task(path)
    assert t.source == str(path)
    assert callable(load_factory(t.model.factory))


def test_learning_rate_falls_along_half_a_cosine_when_final_learning_rate_is_set():
    from fedprune.task import TrainingSection

    cosine = TrainingSection(learning_rate=0.01, final_learning_rate=0.001)
    rates = [cosine.learning_rate_at(r, 5) for r in range(1, 6)]
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.001)
    assert rates[2] == pytest.approx(0.0055) and all(a > b for a, b in zip(rates, rates[1:]))
    assert TrainingSection(learning_rate=0.01).learning_rate_at(4, 5) == 0.01  # no decay by default
    with pytest.raises(TaskError, match="training.final_learning_rate"):
        TrainingSection(learning_rate=0.01, final_learning_rate=0.02).check()


def test_decay_begin_round_holds_the_rate_until_then_and_falls_to_the_final_one_in_the_last_round():
    from fedprune.task import TrainingSection

    late = TrainingSection(learning_rate=0.01, final_learning_rate=0.001, decay_begin_round=15)
    rates = [late.learning_rate_at(r, 20) for r in range(1, 21)]
    assert rates[:15] == [0.01] * 15 and rates[-1] == pytest.approx(0.001)
    assert rates[17] == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 3 / 5)))
    assert all(a > b for a, b in zip(rates[14:], rates[15:]))
    with pytest.raises(TaskError, match="training.decay_begin_round"):
        TrainingSection(learning_rate=0.01, decay_begin_round=0).check()
    with pytest.raises(TaskError, match="training.decay_begin_round"):
        parse_task({"federation": {"rounds": 20, "devices_per_round": 2, "min_devices": 2},
                    "training": {"learning_rate": 0.01, "final_learning_rate": 0.001, "decay_begin_round": 20}})


def test_each_rounds_task_carries_that_rounds_learning_rate_and_devices_accept_it():
    """The schedule lives on the aggregator: a round's task holds one learning_rate, which both
    trainers (Keras and LiteRT) read from the task, and no final_learning_rate a device would refuse."""
    from fedprune.aggregator.collect import training_settings
    from fedprune.converters.protocol import TrainingSettings

    task = parse_task({"federation": {"rounds": 20, "devices_per_round": 2, "min_devices": 2},
                       "training": {"learning_rate": 0.01, "final_learning_rate": 0.001, "decay_begin_round": 2}})
    sent = [TrainingSettings.from_mapping(training_settings(task, r)) for r in (1, 10, 20)]
    assert [s.learning_rate for s in sent] == pytest.approx([0.01, task.training.learning_rate_at(10, 20), 0.001])
    assert sent[0].learning_rate > sent[1].learning_rate > sent[2].learning_rate
    constant = parse_task({"federation": {"rounds": 20, "devices_per_round": 2, "min_devices": 2},
                           "training": {"learning_rate": 0.01}})
    assert training_settings(constant, 20)["learning_rate"] == 0.01


@pytest.mark.parametrize("path", [ROOT / "examples" / "fleet.toml", ROOT / "examples" / "digits.toml"],
                         ids=lambda p: p.name)
def test_a_task_written_as_toml_reads_back_as_the_same_task(path, tmp_path):
    """Scripts hand ``fedprune-simulate`` a task they changed by writing it out (``task_toml``)."""
    from dataclasses import replace

    from fedprune.task import task_toml

    task = load_task(path)
    written = tmp_path / "task.toml"
    written.write_text(task_toml(task))
    assert load_task(written) == replace(task, source=str(written))
