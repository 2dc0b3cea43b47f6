"""The task file: one TOML file that says what the federation trains, on what, and how.

Every section maps to a frozen dataclass; unknown keys and bad values raise ``TaskError`` naming
the key (``pruning.final_sparsity``), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from fedprune.converters.quantize import PRECISION_NAMES
from fedprune.names import ID_RULE, parse_import_spec, valid_federation_id
from fedprune.pruning.rules import Rule, rule_from_config
from fedprune.pruning.schedules import PruningSchedule, schedule_from_config
from fedprune.tomlfile import coerce, read_toml, toml_text

# The aggregator reserves a round's decoded updates up front (one row per device drawn), and a
# run's records grow with its rounds: bounds far above any real fleet, far below an overflow.
MAX_DEVICES_PER_ROUND = 10_000
MAX_ROUNDS = 1_000_000
MAX_ROUND_RETRIES = 2**16 - 2  # attempts 1 .. max_round_retries + 1 fit the update's u16


class TaskError(ValueError):
    """A task file that cannot be used; the message names the key and what to do."""


@dataclass(frozen=True)
class ModelSection:
    factory: str = "fedprune.models:digits_cnn"  # "module:function" returning an uncompiled model

    def check(self) -> None:
        try:
            parse_import_spec(self.factory, "model.factory")
        except ValueError as e:
            raise TaskError(str(e)) from None


@dataclass(frozen=True)
class DataSection:
    dataset: str = "digits"  # a name in fedprune.data.LOADERS
    path: str = ""  # for a user's file or folder (dataset = "npz", "csv" or "images")
    test_fraction: float = 0.2
    # "iid_with_replacement": devices may share samples; for scale tests of more devices than samples only
    partition: Literal["iid", "dirichlet", "shards", "iid_with_replacement"] = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration: small = more skewed label mix per device
    shards_per_device: int = 2
    min_samples: int = 2  # the fewest training samples a simulated device may hold
    label_column: str = "label"  # csv: the column of integer class ids
    image_size: tuple[int, int] | None = None  # images: (height, width) to resize to; default: as they are
    color_mode: Literal["rgb", "grayscale"] = "rgb"  # images: 3 channels or 1

    @property
    def options(self):
        """What the file formats read (``fedprune.data_files.DataOptions``)."""
        from fedprune.data_files import DataOptions

        return DataOptions(self.label_column, self.image_size, self.color_mode)

    def check(self) -> None:
        from fedprune.data import FILE_LOADERS, LOADERS

        if self.dataset not in LOADERS:
            raise TaskError(f"data.dataset must be one of {sorted(LOADERS)}, got {self.dataset!r}")
        if self.dataset in FILE_LOADERS and not self.path:
            raise TaskError(f"data.path is required when data.dataset = {self.dataset!r}")
        if self.image_size is not None and not all(1 <= d <= 4096 for d in self.image_size):
            raise TaskError(f"data.image_size must be [height, width] in pixels, 1-4096 each, "
                            f"got {list(self.image_size)}")
        if not self.label_column:
            raise TaskError("data.label_column must name the CSV column of class ids")
        _in_open_interval("data.test_fraction", self.test_fraction, 0.0, 1.0)
        if self.alpha <= 0:
            raise TaskError(f"data.alpha must be > 0, got {self.alpha}")
        if self.shards_per_device < 1:
            raise TaskError(f"data.shards_per_device must be >= 1, got {self.shards_per_device}")
        if self.min_samples < 1:
            raise TaskError(f"data.min_samples must be >= 1, got {self.min_samples}")


@dataclass(frozen=True)
class FederationSection:
    id: str = "default"  # MQTT topic namespace; agents use the same --federation
    rounds: int = 10
    devices_per_round: int = 10
    min_devices: int = 2  # quorum: a round closes with at least this many updates, else it is retried
    round_timeout_s: float = 120.0
    max_round_retries: int = 3
    wait_for_devices_s: float = 300.0  # how long to wait for devices_per_round devices to be online
    stop_at_accuracy: float = 0.0  # end the run after the first round whose held-out accuracy reaches it (0: never)

    def check(self) -> None:
        if not valid_federation_id(self.id):
            raise TaskError(f"federation.id must be {ID_RULE}, got {self.id!r}")
        for name, most in (("rounds", MAX_ROUNDS), ("devices_per_round", MAX_DEVICES_PER_ROUND),
                           ("min_devices", MAX_DEVICES_PER_ROUND)):
            if not 1 <= getattr(self, name) <= most:
                raise TaskError(f"federation.{name} must be in [1, {most:,}], got {getattr(self, name):,}")
        if self.min_devices > self.devices_per_round:
            raise TaskError(
                f"federation.min_devices ({self.min_devices}) must be <= "
                f"federation.devices_per_round ({self.devices_per_round})"
            )
        if self.round_timeout_s <= 0 or self.wait_for_devices_s <= 0:
            raise TaskError("federation.round_timeout_s and wait_for_devices_s must be > 0")
        if not 0 <= self.max_round_retries <= MAX_ROUND_RETRIES:
            raise TaskError(f"federation.max_round_retries must be in [0, {MAX_ROUND_RETRIES:,}] (an update carries "
                            f"its attempt in 16 bits), got {self.max_round_retries:,}")
        if not 0.0 <= self.stop_at_accuracy <= 1.0:
            raise TaskError(f"federation.stop_at_accuracy must be in [0, 1] (0: run every round), got "
                            f"{self.stop_at_accuracy}")


@dataclass(frozen=True)
class TrainingSection:
    local_epochs: int = 1
    batch_size: int = 16
    optimizer: Literal["sgd", "adam"] = "adam"
    learning_rate: float = 0.005
    # > 0: the devices' learning rate falls from learning_rate in round decay_begin_round to this in
    # the last round, along half a cosine; 0: learning_rate in every round.
    final_learning_rate: float = 0.0
    # The last round at learning_rate before the fall (1: it falls over the whole run). A later one
    # decays only the last rounds: for a pruned model whose mask stops changing at pruning.end_round,
    # a fine-tuning phase that does not slow the rounds in which it still learns its mask.
    decay_begin_round: int = 1

    def learning_rate_at(self, round_number: int, rounds: int) -> float:
        """The devices' learning rate in round ``round_number`` (1-based) of ``rounds``."""
        first = self.decay_begin_round
        if self.final_learning_rate <= 0 or rounds <= first or round_number <= first:
            return self.learning_rate
        progress = min(round_number - first, rounds - first) / (rounds - first)
        return self.final_learning_rate + 0.5 * (self.learning_rate - self.final_learning_rate) * (
            1.0 + math.cos(math.pi * progress))

    def check(self) -> None:
        if self.local_epochs < 1:
            raise TaskError(f"training.local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise TaskError(f"training.batch_size must be >= 1, got {self.batch_size}")
        if self.learning_rate <= 0:
            raise TaskError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.final_learning_rate <= self.learning_rate:
            raise TaskError(f"training.final_learning_rate must be in [0, learning_rate = {self.learning_rate}] "
                            f"(0: no decay), got {self.final_learning_rate}")
        if isinstance(self.decay_begin_round, bool) or not isinstance(self.decay_begin_round, int) \
                or self.decay_begin_round < 1:
            raise TaskError(f"training.decay_begin_round must be a round number >= 1 (the last round at "
                            f"learning_rate), got {self.decay_begin_round!r}")


@dataclass(frozen=True)
class PruningSection:
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.0  # 0 disables mask pruning (dense FedAvg, or structured only)
    begin_round: int = 1
    end_round: int = 1
    frequency: int = 1
    power: float = 3.0
    # polynomial: tfmot's PolynomialDecay in rounds; constant: final_sparsity at every turn;
    # adaptive: rise by `step` while held-out accuracy stays within `tolerance` of the best, else back off
    schedule: str = "polynomial"  # or any registered schedule (fedprune.pruning.schedules.SCHEDULES)
    schedule_params: dict = field(default_factory=dict)  # [pruning.schedule_params]: a plug-in schedule's
    step: float = 0.1
    tolerance: float = 0.01
    # Which weights a pruning step removes (fedprune.pruning.rules): magnitude (to the scheduled
    # sparsity, per layer or `scope = "global"`), absolute (|w| <= threshold), max_rate
    # (|w| <= rate * max|w|), row_mean (|w| <= scale * mean of its row), m_by_n (keep m of n inputs).
    rule: str = "magnitude"  # or any registered rule (fedprune.pruning.rules)
    rule_params: dict = field(default_factory=dict)  # [pruning.rule_params]: a plug-in rule's parameters
    scope: Literal["layer", "global"] = "layer"
    # With scope = "global": each layer keeps at least this share of the overall density (0.5: at
    # 95 % sparsity no layer keeps under 2.5 % of its weights); 0 ranks by magnitude alone, which can
    # empty a layer of small weights (fedprune.pruning.masks.global_magnitude_masks).
    global_floor: float = 0.5
    threshold: float = 0.0
    rate: float = 0.0
    scale: float = 1.0
    m: int = 2
    n: int = 4
    layers: dict = field(default_factory=dict)  # [pruning.layers.<name>]: a rule for one layer
    leave_dense: tuple[str, ...] = ()  # layer names never pruned
    fine_tune_rounds: int = 0  # rounds of training with the final mask fixed after end_round
    mask_owner: Literal["aggregator", "device"] = "aggregator"  # who prunes: see docs/pruning.md
    # Regrowth (fedprune.pruning.regrowth): at each pruning turn, swap this fraction of the kept
    # weights (the smallest) for the pruned ones with the largest gradient the devices report.
    regrowth: float = 0.0
    # "cosine": the turns' regrowth falls from `regrowth` at begin_round to 0 at end_round along half
    # a cosine (RigL's annealing; fewer gradient reports too); "constant": `regrowth` at every turn.
    regrowth_decay: Literal["constant", "cosine"] = "constant"
    # Structured pruning: after round `structured_round`, remove this fraction of the units/filters
    # of every Dense/Conv layer not in leave_dense (lowest L1/L2 norm), shrinking the model itself.
    structured_fraction: float = 0.0
    structured_round: int = 0
    structured_norm: Literal["l1", "l2"] = "l2"

    def check(self, rounds: int) -> None:
        try:
            self.schedule_object()
        except ValueError as e:  # "begin_round must be ..." names a key of this section; the rest do not
            key = str(e).split(" ", 1)[0]
            raise TaskError(f"pruning.{e}" if hasattr(self, key) else f"pruning: {e}") from None
        if self.final_sparsity > 0 and self.end_round > rounds:
            raise TaskError(
                f"pruning.end_round ({self.end_round}) is after the last round "
                f"(federation.rounds = {rounds}); the final sparsity would never be reached"
            )
        try:
            self.default_rule()
        except ValueError as e:
            raise TaskError(f"pruning: {e}") from None
        for layer, cfg in self.layers.items():
            if not isinstance(cfg, dict):
                raise TaskError(f"pruning.layers.{layer} must be a table with a 'rule' key")
            try:
                rule_from_config(cfg)
            except ValueError as e:
                raise TaskError(f"pruning.layers.{layer}: {e}") from None
        if self.scope == "global" and (self.rule != "magnitude" or self.layers):
            raise TaskError("pruning.scope = 'global' ranks all layers by magnitude: use rule = 'magnitude' "
                            "and no [pruning.layers] tables")
        if not 0.0 <= self.global_floor <= 1.0:
            raise TaskError(f"pruning.global_floor must be in [0, 1] (a share of the overall density), "
                            f"got {self.global_floor}")
        if self.global_floor != 0.5 and self.scope != "global":
            raise TaskError("pruning.global_floor applies to scope = 'global' only: set scope = 'global' "
                            "or remove global_floor")
        if self.mask_owner == "device" and (self.schedule != "polynomial" or self.rule != "magnitude"):
            raise TaskError("pruning.mask_owner = 'device' prunes with tfmot by magnitude on a polynomial "
                            "schedule: use schedule = 'polynomial' and rule = 'magnitude'")
        if self.mask_owner == "device" and self.begin_round == 0:
            raise TaskError("pruning.begin_round = 0 prunes the initial model on the aggregator; with "
                            "mask_owner = 'device' the devices prune while they train: use begin_round >= 1")
        if not 0.0 <= self.regrowth < 0.5:
            raise TaskError(f"pruning.regrowth must be in [0, 0.5), got {self.regrowth}")
        if self.regrowth_decay not in ("constant", "cosine"):
            raise TaskError(f"pruning.regrowth_decay must be 'constant' or 'cosine', got {self.regrowth_decay!r}")
        if self.regrowth > 0 and self.mask_owner == "device":
            raise TaskError("pruning.regrowth works with mask_owner = 'aggregator' (device masks regrow by averaging)")
        if not 0.0 <= self.structured_fraction < 1.0:
            raise TaskError(f"pruning.structured_fraction must be in [0, 1), got {self.structured_fraction}")
        if self.structured_fraction > 0 and not 1 <= self.structured_round < rounds:
            raise TaskError(
                f"pruning.structured_round must be in [1, {rounds - 1}] (a round followed by at least one "
                f"more to fine-tune the smaller model), got {self.structured_round}"
            )
        if self.fine_tune_rounds < 0:
            raise TaskError(f"pruning.fine_tune_rounds must be >= 0, got {self.fine_tune_rounds}")
        if self.final_sparsity > 0 and self.end_round + self.fine_tune_rounds > rounds:
            raise TaskError(
                f"pruning.end_round ({self.end_round}) + pruning.fine_tune_rounds ({self.fine_tune_rounds}) "
                f"exceeds federation.rounds ({rounds}); lower end_round or add rounds"
            )

    def schedule_config(self) -> dict[str, Any]:
        """The config of the schedule this section describes (``schedule_from_config``'s input)."""
        rounds = {"begin_round": self.begin_round, "end_round": self.end_round, "frequency": self.frequency}
        built_in: dict[str, dict[str, Any]] = {
            "polynomial": {"initial_sparsity": self.initial_sparsity, "final_sparsity": self.final_sparsity,
                           "power": self.power, **rounds},
            "constant": {"target_sparsity": self.final_sparsity, **rounds},
            "adaptive": {"initial_sparsity": self.initial_sparsity, "final_sparsity": self.final_sparsity,
                         "step": self.step, "tolerance": self.tolerance, **rounds},
        }
        # A plug-in schedule takes exactly its [pruning.schedule_params] (docs/extending.md).
        return {"schedule": self.schedule, **built_in.get(self.schedule, {}), **self.schedule_params}

    def schedule_object(self) -> PruningSchedule:
        """The schedule this section describes (a fresh one: adaptive schedules carry state)."""
        return schedule_from_config(self.schedule_config())

    def default_rule(self) -> Rule:
        params = {"absolute": {"threshold": self.threshold}, "max_rate": {"rate": self.rate},
                  "row_mean": {"scale": self.scale}, "m_by_n": {"m": self.m, "n": self.n}}.get(self.rule, {})
        return rule_from_config({"rule": self.rule, **params, **self.rule_params})

    def rule_for(self, layer: str) -> Rule:
        return rule_from_config(self.layers[layer]) if layer in self.layers else self.default_rule()

    @property
    def enabled(self) -> bool:
        """Unstructured (mask) pruning is on."""
        return self.final_sparsity > 0 or self.rule != "magnitude" or bool(self.layers)


@dataclass(frozen=True)
class TransportSection:
    # names of registered value precisions (fedprune.converters.quantize.PRECISION_NAMES)
    uplink_precision: str = "int8"
    downlink_precision: str = "float32"
    update: Literal["delta", "weights"] = "delta"  # what devices send: weight delta (quantizes better) or weights
    error_feedback: bool = True  # carry each round's quantization error into the next update
    stochastic_rounding: bool = False
    compression: Literal["none", "zlib", "zstd"] = "none"  # lossless stage, used only when it shrinks
    max_payload_bytes: int = 1_000_000  # one MQTT message; larger ones are sent in chunks
    max_message_bytes: int = 64_000_000  # a whole (reassembled) message
    # What one device may send the aggregator per round (its update, retries, redeliveries,
    # presence), counted before anything is buffered; past either, it is ignored for the rest of
    # the round. 0: derived from the model (fedprune.aggregator.peer_budgets.default_budget).
    max_device_messages_per_round: int = 0
    max_device_bytes_per_round: int = 0
    # Update messages waiting for the round loop, all devices together; beyond, new ones are dropped.
    max_inbox_bytes: int = 256_000_000
    # Sparsified updates (fedprune.sparsify.SPARSIFIERS): "none", or e.g. "top_k" with
    # [transport.sparsifier_params] fraction = 0.01: each device sends that share of each kernel's delta
    sparsifier: str = "none"
    sparsifier_params: dict = field(default_factory=dict)

    def sparsifier_config(self) -> dict | None:
        """The config the tasks carry to the devices (None: updates are not sparsified)."""
        return None if self.sparsifier == "none" else {"sparsifier": self.sparsifier, **self.sparsifier_params}

    def check(self) -> None:
        if self.sparsifier_config() is not None:
            from fedprune.sparsify import sparsifier_from_config

            try:
                sparsifier_from_config(self.sparsifier_config())
            except ValueError as e:
                raise TaskError(f"transport.sparsifier: {e} ([transport.sparsifier_params] holds its parameters)") \
                    from None
            if self.update != "delta":
                raise TaskError("transport.sparsifier sparsifies deltas: it needs transport.update = \"delta\"")
        for key in ("uplink_precision", "downlink_precision"):
            if getattr(self, key) not in PRECISION_NAMES:
                raise TaskError(f"transport.{key} must be one of {list(PRECISION_NAMES)}, got {getattr(self, key)!r}")
        if not 1024 <= self.max_payload_bytes <= 256 * 1024 * 1024:
            raise TaskError(
                f"transport.max_payload_bytes must be in [1024, 268435456], got {self.max_payload_bytes}"
            )
        if self.max_message_bytes < self.max_payload_bytes:
            raise TaskError(
                f"transport.max_message_bytes ({self.max_message_bytes}) must be >= "
                f"transport.max_payload_bytes ({self.max_payload_bytes})"
            )
        for key in ("max_device_messages_per_round", "max_device_bytes_per_round"):
            if getattr(self, key) < 0:
                raise TaskError(f"transport.{key} must be >= 0 (0: derived from the model), got {getattr(self, key)}")
        if self.max_inbox_bytes < self.max_message_bytes:
            raise TaskError(f"transport.max_inbox_bytes ({self.max_inbox_bytes}) must be >= "
                            f"transport.max_message_bytes ({self.max_message_bytes}): a whole update must fit")


@dataclass(frozen=True)
class AggregationSection:
    """How the round's updates become one (see docs/robustness.md)."""

    # fedavg: sample-weighted mean; median, trimmed_mean: coordinate-wise (Yin et al. 2018);
    # krum, multi_krum: the updates closest to their neighbours (Blanchard et al. 2017)
    # Any registered strategy's name (fedprune.aggregator.strategies.STRATEGIES); the aggregator
    # refuses an unknown one when it loads the task.
    method: str = "fedavg"
    clip_norm: float = 0.0  # > 0: scale every update down to at most this L2 norm first (any method)
    trim_fraction: float = 0.1  # trimmed_mean: drop this fraction of the largest and of the smallest values
    byzantine: int = 1  # krum, multi_krum: hostile updates tolerated per round (f)
    multi_krum_keep: int = 0  # multi_krum: updates averaged (m); 0 = the round's updates minus byzantine
    params: dict = field(default_factory=dict)  # [aggregation.params]: a plug-in strategy's parameters

    def check(self, fed: FederationSection) -> None:
        if self.clip_norm < 0:
            raise TaskError(f"aggregation.clip_norm must be >= 0 (0 = no clipping), got {self.clip_norm}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise TaskError(f"aggregation.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.method == "trimmed_mean" and int(self.trim_fraction * fed.devices_per_round) < 1:
            raise TaskError(
                f"aggregation.trim_fraction ({self.trim_fraction}) x federation.devices_per_round "
                f"({fed.devices_per_round}) is below 1: nothing would be trimmed; raise trim_fraction"
            )
        if self.byzantine < 0 or self.multi_krum_keep < 0:
            raise TaskError("aggregation.byzantine and aggregation.multi_krum_keep must be >= 0")
        if self.method in ("krum", "multi_krum") and fed.min_devices < 2 * self.byzantine + 3:
            raise TaskError(
                f"aggregation.method = '{self.method}' with aggregation.byzantine = {self.byzantine} needs "
                f"at least {2 * self.byzantine + 3} updates per round: raise federation.min_devices "
                f"(now {fed.min_devices}) or lower byzantine"
            )
        if self.method == "multi_krum" and self.multi_krum_keep > fed.min_devices - self.byzantine:
            raise TaskError(
                f"aggregation.multi_krum_keep ({self.multi_krum_keep}) must be <= federation.min_devices - "
                f"aggregation.byzantine ({fed.min_devices - self.byzantine}), or 0 for all but byzantine"
            )

    @property
    def plain(self) -> bool:
        """Plain FedAvg, no clipping."""
        return self.method == "fedavg" and self.clip_norm == 0


@dataclass(frozen=True)
class PrivacySection:
    """DP-FedAvg (McMahan et al. 2018): on when noise_multiplier > 0; see docs/robustness.md."""

    noise_multiplier: float = 0.0  # z: noise std is z * clip_norm on the sum of the clipped updates
    clip_norm: float = 1.0  # C: every update is clipped to this L2 norm by the aggregator
    clip_on_device: bool = False  # devices clip to clip_norm too, before quantizing
    delta: float = 1e-5  # epsilon is reported for this delta

    def check(self) -> None:
        if self.noise_multiplier < 0:
            raise TaskError(f"privacy.noise_multiplier must be >= 0 (0 = off), got {self.noise_multiplier}")
        if self.clip_norm <= 0:
            raise TaskError(f"privacy.clip_norm must be > 0, got {self.clip_norm}")
        if not 0.0 < self.delta < 1.0:
            raise TaskError(f"privacy.delta must be in (0, 1), got {self.delta}")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


@dataclass(frozen=True)
class DeviceProfile:
    """One tier of simulated devices (``[[simulation.profiles]]``); used by ``fedprune-simulate`` only.

    Link speeds are in kbit/s (0 = not emulated: as fast as the broker moves it); ``speed`` is a
    multiplier on measured training time (2.0 = a device half as fast as this host). ``trainer``:
    what the tier's devices train with, Keras or (a device without TensorFlow) the aggregator's
    trainable TFLite file in LiteRT; a fleet may mix tiers of both.
    """

    name: str = "default"
    weight: float = 1.0  # relative share of the fleet in this tier
    speed: float = 1.0
    availability: float = 1.0  # probability that the device is online (drawn once per device)
    dropout: float = 0.0  # probability that a selected device goes offline mid-round
    uplink_kbps: float = 0.0
    downlink_kbps: float = 0.0
    latency_ms: float = 0.0  # one way, added to every message in both directions
    loss: float = 0.0  # probability that one transmission of a message is lost and sent again
    trainer: Literal["keras", "litert"] = "keras"

    def check(self, key: str) -> None:
        if self.weight <= 0:
            raise TaskError(f"{key}.weight must be > 0, got {self.weight}")
        if self.speed <= 0:
            raise TaskError(f"{key}.speed must be > 0 (a multiplier on training time), got {self.speed}")
        if not 0.0 < self.availability <= 1.0:
            raise TaskError(f"{key}.availability must be in (0, 1], got {self.availability}")
        if not 0.0 <= self.dropout < 1.0:
            raise TaskError(f"{key}.dropout must be in [0, 1), got {self.dropout}")
        for name in ("uplink_kbps", "downlink_kbps", "latency_ms"):
            if getattr(self, name) < 0:
                raise TaskError(f"{key}.{name} must be >= 0 (0 = not emulated), got {getattr(self, name)}")
        if not 0.0 <= self.loss < 1.0:
            raise TaskError(f"{key}.loss must be in [0, 1), got {self.loss}")


@dataclass(frozen=True)
class SimulationSection:
    """How ``fedprune-simulate`` emulates the fleet; ignored by the aggregator and real agents."""

    profiles: tuple[DeviceProfile, ...] = (DeviceProfile(),)
    rejoin_s: float = 10.0  # a device that dropped out mid-round comes back online after this

    def check(self) -> None:
        if not self.profiles:
            raise TaskError("simulation.profiles must list at least one [[simulation.profiles]] table")
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise TaskError(f"simulation.profiles: names must be unique, got {names}")
        for i, p in enumerate(self.profiles):
            p.check(f"simulation.profiles[{i}]")
        if self.rejoin_s < 0:
            raise TaskError(f"simulation.rejoin_s must be >= 0, got {self.rejoin_s}")


@dataclass(frozen=True)
class Task:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    federation: FederationSection = field(default_factory=FederationSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    transport: TransportSection = field(default_factory=TransportSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    seed: int = 0
    source: str = ""  # the file it came from, for messages

    def check(self) -> "Task":
        self.model.check()
        self.data.check()
        self.federation.check()
        self.training.check()
        if 1 < self.training.decay_begin_round >= self.federation.rounds:
            raise TaskError(f"training.decay_begin_round ({self.training.decay_begin_round}) must be before the "
                            f"last round (federation.rounds = {self.federation.rounds}), or the rate never falls")
        self.pruning.check(self.federation.rounds)
        self.transport.check()
        self.aggregation.check(self.federation)
        self.privacy.check()
        self._check_aggregation_combinations()
        self.simulation.check()
        return self

    def _check_aggregation_combinations(self) -> None:
        device_masks = self.pruning.enabled and self.pruning.mask_owner == "device"
        if device_masks and not (self.aggregation.plain and not self.privacy.enabled):
            raise TaskError("pruning.mask_owner = 'device' averages each weight over the devices that kept it: "
                            "it works with aggregation.method = 'fedavg', no aggregation.clip_norm and no [privacy]")
        if self.privacy.enabled and self.pruning.regrowth > 0:
            raise TaskError("pruning.regrowth chooses the mask from the gradients devices report, which "
                            "[privacy] does not noise: set pruning.regrowth = 0 with privacy.noise_multiplier > 0")
        if self.privacy.enabled and not self.aggregation.plain:
            raise TaskError("[privacy] runs DP-FedAvg, which clips (privacy.clip_norm) and averages itself: "
                            "leave aggregation.method = 'fedavg' and aggregation.clip_norm = 0")


def load_task(path: str | Path) -> Task:
    """Read and validate a task file. Relative data paths are resolved against the file's folder."""
    p = Path(path)
    raw = read_toml(p, "task file", TaskError)
    try:
        task = parse_task(raw, source=str(p))
    except TaskError as e:
        raise TaskError(f"{p}: {e}") from None
    if task.data.path and not Path(task.data.path).is_absolute():
        task = dataclasses.replace(
            task, data=dataclasses.replace(task.data, path=str(p.parent / task.data.path))
        )
    return task


def parse_task(raw: dict[str, Any], source: str = "") -> Task:
    """Build a ``Task`` from parsed TOML, rejecting unknown keys and wrongly typed values."""
    top = {f.name: f for f in dataclasses.fields(Task) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top:
            raise TaskError(f"unknown key {key!r}; expected one of {sorted(top)}")
        f = top[key]
        if dataclasses.is_dataclass(_resolve(Task, f.name)):
            if not isinstance(value, dict):
                raise TaskError(f"{key!r} must be a table ([{key}])")
            kwargs[key] = _build_section(_resolve(Task, f.name), value, key)
        else:
            kwargs[key] = _coerce(value, _resolve(Task, f.name), key)
    return Task(**kwargs, source=source).check()


def _build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise TaskError(f"unknown key '{prefix}.{key}'; expected one of {sorted(fields)}")
        kwargs[key] = _coerce(value, _resolve(cls, key), f"{prefix}.{key}")
    return cls(**kwargs)


def _resolve(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is tuple and get_args(tp) and dataclasses.is_dataclass(get_args(tp)[0]):  # an array of tables
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise TaskError(f"{key} must be an array of tables ([[{key}]]), got {value!r}")
        return tuple(_build_section(get_args(tp)[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    return coerce(value, tp, key, TaskError)


def _in_open_interval(key: str, v: float, lo: float, hi: float) -> None:
    if not lo < v < hi:
        raise TaskError(f"{key} must be in ({lo}, {hi}), got {v}")


def task_toml(task: Task) -> str:
    """``task`` as a task file's text: ``load_task`` reads it back as the same task (but for
    ``source``). For scripts that hand ``fedprune-simulate`` a task they changed."""
    raw = dataclasses.asdict(task)
    raw.pop("source")
    return toml_text(raw)
