"""The architecture is data, not code (fedprune.architecture): forged Keras configs that would make
``model_from_json`` import a module or call a function are refused before anything is imported,
on the device, in the training child and on the aggregator's ``--resume``."""

from __future__ import annotations

import copy
import json
import logging
import sys
import uuid
from pathlib import Path

import pytest

from fedprune.architecture import (
    ArchitectureError,
    check_architecture,
    layer_classes,
    model_from_architecture_json,
    register_custom_layers,
    registered_custom_layers,
)
from fedprune.keras_setup import keras
from fedprune.models import architecture_of, digits_cnn, mlp, mnist1d_cnn

from edge_helpers import MARKER_MODULE as PAYLOAD  # importing it, or calling its function, leaves a marker file


@pytest.fixture(autouse=True)
def no_custom_layers():
    register_custom_layers([])
    yield
    register_custom_layers([])


@pytest.fixture
def payload(tmp_path, monkeypatch):
    """(module name, marker path prefix): a fresh importable module per test."""
    name = f"payload_{uuid.uuid4().hex[:8]}"
    marker = str(tmp_path / "marker")
    (tmp_path / f"{name}.py").write_text(PAYLOAD.format(marker=marker))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


def code_ran(marker: str) -> list[str]:
    return sorted(p.name for p in Path(marker).parent.glob(Path(marker).name + ".*"))


def base_config() -> dict:
    return json.loads(mlp((4,), 2).to_json())


def dense() -> dict:
    return copy.deepcopy(base_config()["config"]["layers"][2])


def function_object(module: str) -> dict:
    """How Keras serializes a function: its name and the module it is imported from."""
    return {"class_name": "function", "config": "run", "module": module, "registered_name": "run"}


def lambda_layer(module: str) -> dict:
    return {"module": "keras.layers", "class_name": "Lambda", "registered_name": None,
            "config": {"name": "lam", "trainable": True, "dtype": "float32", "function": function_object(module),
                       "function_type": "function", "module": None, "output_shape": None,
                       "output_shape_type": "raw", "output_shape_module": None, "arguments": {}}}


def forged(layer: dict) -> str:
    """The MLP's architecture with ``layer`` inserted after its Flatten."""
    config = base_config()
    config["config"]["layers"].insert(2, layer)
    return json.dumps(config)


def with_dense(**changes) -> str:
    layer = dense()
    layer["config"].update(changes)
    return forged(layer)


def in_functional(layer: dict) -> str:
    """A functional model whose second layer is a Sequential holding ``layer``."""
    inner = base_config()
    inner["config"]["layers"].insert(2, layer)
    inner["config"]["name"] = "inner"
    outer = json.loads(keras.Model(*(lambda i: (i, keras.Sequential([keras.layers.Flatten()], name="inner")(i)))(
        keras.layers.Input((4,)))).to_json())
    entry = outer["config"]["layers"][1]
    entry.update({"class_name": "Sequential", "config": inner["config"]})
    return json.dumps(outer)


ATTACKS = {
    # name: (builder(module) -> JSON, words the refusal must contain, {m} for the module)
    "lambda calling a module's function": (lambda m: forged(lambda_layer(m)), "'Lambda'"),
    "function_type in another layer's config": (
        lambda m: with_dense(function_type="function", function=function_object(m)), "'function_type'"),
    "activation as a serialized function": (lambda m: with_dense(activation=function_object(m)), "activation"),
    "activation naming module:function": (lambda m: with_dense(activation=f"{m}:run"), "'{m}:run'"),
    "activation naming module.function": (lambda m: with_dense(activation=f"{m}.run"), "'{m}.run'"),
    "module-qualified layer class": (
        lambda m: forged({"module": m, "class_name": "Boom", "config": {}, "registered_name": "Boom"}), "'Boom'"),
    "registered name of a foreign class": (
        lambda m: forged({**dense(), "class_name": f"{m}>Boom", "registered_name": f"{m}>Boom"}), ">Boom'"),
    "built-in class from a foreign module": (lambda m: forged({**dense(), "module": m}), "module '{m}'"),
    "initializer from a foreign module": (
        lambda m: with_dense(kernel_initializer={"module": m, "class_name": "Boom", "config": {},
                                                 "registered_name": None}), "'Boom'"),
    "passively serialized object": (
        lambda m: with_dense(kernel_initializer={"module": m, "class_name": "GlorotUniform", "config": {},
                                                 "registered_name": None, "__passive_serialization__": True}),
        "'__passive_serialization__'"),
    "lambda inside TimeDistributed": (
        lambda m: forged({"module": "keras.layers", "class_name": "TimeDistributed", "registered_name": None,
                          "config": {"name": "td", "layer": lambda_layer(m)}}), "'Lambda'"),
    "lambda inside Bidirectional": (
        lambda m: forged({"module": "keras.layers", "class_name": "Bidirectional", "registered_name": None,
                          "config": {"name": "bi", "layer": lambda_layer(m)}}), "'Lambda'"),
    "lambda in a Sequential inside a Functional model": (lambda m: in_functional(lambda_layer(m)), "'Lambda'"),
    "function in a Functional model's call arguments": (
        lambda m: in_functional({**dense(), "inbound_nodes": [[["input_1", 0, 0, {"fn": function_object(m)}]]]}),
        "'function'"),
    "TF op layer": (lambda m: forged({"class_name": "TFOpLambda", "config": {"name": "op", "function": "io.write_file"}}),
                    "'TFOpLambda'"),
    "TypeSpec object": (lambda m: with_dense(units={"class_name": "TypeSpec", "type_spec": m, "serialized": []}),
                        "'TypeSpec'"),
}


def test_the_attack_runs_code_through_plain_model_from_json(payload):
    """The reason for all this: Keras imports the named module and calls its function."""
    module, marker = payload
    keras.models.model_from_json(forged(lambda_layer(module)))
    assert code_ran(marker) == ["marker.called", "marker.imported"]


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_forged_architectures_are_refused_before_any_code_runs(attack, payload):
    module, marker = payload
    build, named = ATTACKS[attack]
    model_json = build(module)
    with pytest.raises(ArchitectureError) as refused:
        model_from_architecture_json(model_json)
    assert named.format(m=module) in str(refused.value)
    assert "\n" not in str(refused.value)
    assert code_ran(marker) == []
    assert module not in sys.modules


@pytest.mark.parametrize("factory,shape", [(digits_cnn, (8, 8, 1)), (mnist1d_cnn, (40, 1)), (mlp, (30,))])
def test_the_built_in_models_build_unchanged(factory, shape):
    model = factory(shape, 10)
    rebuilt = model_from_architecture_json(model.to_json())
    assert rebuilt.to_json() == model.to_json()


def test_wrappers_recurrent_layers_nested_models_and_regularizers_are_allowed():
    inputs = keras.layers.Input((5, 4))
    x = keras.layers.TimeDistributed(keras.layers.Dense(3, kernel_regularizer="l2", kernel_constraint="max_norm"))(inputs)
    x = keras.layers.Bidirectional(keras.layers.LSTM(2, return_sequences=True))(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GRU(3, activation="tanh", recurrent_activation="sigmoid")(x)
    head = keras.Sequential([keras.layers.Dense(2, activation="softmax", kernel_initializer="he_normal")], name="head")
    y = keras.layers.Add()([head(x), head(x)])
    model = keras.Model(inputs, y)
    assert model_from_architecture_json(model.to_json()).count_params() == model.count_params()


@pytest.mark.parametrize("text,words", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"class_name": "Dense", "config": {}}', "top level"),
    ('{"class_name": "Sequential", "config": {"layers": []}, "extra": 1}', "'extra'"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
])
def test_malformed_architectures_are_refused_with_one_line(text, words):
    with pytest.raises(ArchitectureError, match=words):
        check_architecture(text)


def test_deep_nesting_is_refused():
    layer: dict = dense()
    for i in range(100):
        layer = {"class_name": "TimeDistributed", "module": "keras.layers", "config": {"name": f"t{i}", "layer": layer}}
    with pytest.raises(ArchitectureError, match="nested deeper"):
        check_architecture(forged(layer))


# --- custom layers: only through the device's own registry --------------------------------------

CUSTOM = '''
from fedprune.keras_setup import keras

class Doubling(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x

def not_a_layer():
    return None
'''


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    name = f"custom_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def custom_model_json(module_name: str) -> str:
    layer = {"module": module_name, "class_name": "Doubling", "config": {"name": "double", "trainable": True,
                                                                          "dtype": "float32"}, "registered_name": "Doubling"}
    return forged(layer)


def test_a_custom_layer_is_refused_unless_the_devices_config_registers_it(custom_module):
    model_json = custom_model_json(custom_module)
    with pytest.raises(ArchitectureError, match="layer 'Doubling' is not allowed.*custom_layers"):
        model_from_architecture_json(model_json)
    assert custom_module not in sys.modules  # refused before its module was imported
    register_custom_layers([f"{custom_module}:Doubling"])
    assert registered_custom_layers() == (f"{custom_module}:Doubling",)
    model = model_from_architecture_json(model_json)
    assert [type(l).__name__ for l in model.layers] == ["Flatten", "Doubling", "Dense", "Dense", "Dense"]
    assert "Doubling" in layer_classes(model)


def test_a_registered_custom_layer_may_come_only_from_its_own_module(custom_module, payload):
    register_custom_layers([f"{custom_module}:Doubling"])
    module, marker = payload
    layer = json.loads(custom_model_json(custom_module))["config"]["layers"][2]
    layer["module"] = module
    with pytest.raises(ArchitectureError, match=f"module '{module}' is not allowed"):
        model_from_architecture_json(forged(layer))
    assert code_ran(marker) == []


@pytest.mark.parametrize("spec,words", [
    ("os.system", "must look like"),
    ("os:system; rm", "must look like"),
    ("mod:Dense", "names a Keras layer"),
    ("tf_keras.layers:Lambda", "names a Keras layer"),
])
def test_bad_custom_layer_specs_are_refused(spec, words):
    with pytest.raises(ArchitectureError, match=words):
        register_custom_layers([spec])


def test_a_custom_layer_spec_must_name_a_layer_class(custom_module):
    register_custom_layers([f"{custom_module}:not_a_layer"])
    with pytest.raises(ArchitectureError, match="not a Keras Layer class"):
        model_from_architecture_json(mlp((4,), 2).to_json())


def test_the_agent_config_takes_custom_layers_and_checks_their_form():
    from fedprune.edge_agent.config import ConfigError, parse_config

    config = parse_config({"model": {"custom_layers": ["mypkg.layers:MyLayer"]}}).check(require_run=False)
    assert config.model.custom_layers == ("mypkg.layers:MyLayer",)
    with pytest.raises(ConfigError, match="model.custom_layers"):
        parse_config({"model": {"custom_layers": ["os.system"]}}).check(require_run=False)


def test_a_factory_whose_model_devices_would_refuse_fails_on_the_aggregator(tmp_path, monkeypatch, caplog):
    from fedprune.models import build_model

    name = f"factories_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(CUSTOM + '''
def with_lambda(input_shape, num_classes):
    return keras.Sequential([keras.layers.Input(input_shape), keras.layers.Lambda(lambda x: x * 2),
                             keras.layers.Flatten(), keras.layers.Dense(num_classes)])

def with_custom(input_shape, num_classes):
    return keras.Sequential([keras.layers.Input(input_shape), Doubling(), keras.layers.Flatten(),
                             keras.layers.Dense(num_classes)])
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="builds a model devices refuse: .*layer 'Lambda' is not allowed"):
        build_model(f"{name}:with_lambda", (4,), 2)
    with caplog.at_level(logging.WARNING):
        build_model(f"{name}:with_custom", (4,), 2)
    assert f"{name}:Doubling" in caplog.text and "custom_layers" in caplog.text
    sys.modules.pop(name, None)


# --- where architectures arrive -------------------------------------------------------------------


def test_the_device_refuses_a_forged_architecture_message_and_logs_it(payload, caplog):
    from fedprune.converters.protocol import Architecture
    from fedprune.edge_agent.device import DeviceSession

    from signing_helpers import VERIFY_KEY, signed

    module, marker = payload
    honest = architecture_of(mlp((4,), 2))
    session = DeviceSession("pi-01", 10, aggregator_key=VERIFY_KEY)
    topic = session.topics.architecture
    # Signed by the aggregator's own key (a compromised aggregator): the allow-list still holds.
    message = Architecture(forged(lambda_layer(module)), honest.digest, honest.shapes, honest.names).encode()
    with caplog.at_level(logging.ERROR):
        assert session.receive(topic, signed(topic, message)) is None
    assert session.architecture is None
    assert "'Lambda'" in caplog.text and "refused a message on" in caplog.text
    session.receive(topic, signed(topic, honest.encode()))
    assert session.architecture == honest
    assert code_ran(marker) == []


def test_the_keras_trainer_refuses_a_forged_architecture(payload):
    """The training child (and the simulator) build through the same function."""
    import numpy as np

    from fedprune.converters.protocol import Architecture
    from fedprune.edge_agent.trainer import KerasTrainer

    module, marker = payload
    honest = architecture_of(mlp((4,), 2))
    forged_architecture = Architecture(forged(lambda_layer(module)), "f" * 32, honest.shapes, honest.names)
    with pytest.raises(ArchitectureError, match="'Lambda'"):
        KerasTrainer().train(forged_architecture, None, np.zeros((2, 4), np.float32), np.zeros(2, np.int64))
    assert code_ran(marker) == []


def test_resume_refuses_a_checkpoint_with_a_forged_architecture(tmp_path, payload):
    from fedprune.aggregator.checkpoint import load_latest_checkpoint, save_checkpoint
    from fedprune.aggregator.server import Aggregator
    from fedprune.data import load_dataset
    from federation_helpers import small_task

    module, marker = payload
    task, dataset = small_task(), load_dataset("digits")
    first = Aggregator(task, dataset, "mqtt://127.0.0.1:1", tmp_path, export_tflite=False)
    save_checkpoint(tmp_path / "checkpoints", first.state)
    state = load_latest_checkpoint(tmp_path / "checkpoints")
    config = json.loads(first.architecture.model_json)
    config["config"]["layers"].insert(1, lambda_layer(module))
    state.model_json = json.dumps(config)
    save_checkpoint(tmp_path / "checkpoints", state)
    with pytest.raises(ArchitectureError, match="'Lambda'"):
        Aggregator(task, dataset, "mqtt://127.0.0.1:1", tmp_path, resume=True, export_tflite=False)
    assert code_ran(marker) == []
