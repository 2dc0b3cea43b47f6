"""The agent's configuration file (``/etc/fedprune/agent.toml``, see ``deploy/agent.toml``).

Every key has a command-line flag that overrides it. Unknown sections and keys, and values of
the wrong type or range, are refused with a ``ConfigError`` that names the key, so a typo never
falls back to a default in silence.

    [broker]
    url = "mqtt://laptop.local:1883"
    username = "pi-07"                          # optional
    password_file = "/etc/fedprune/password"    # optional; the file holds the password only
    ca_file = "/etc/fedprune/ca.crt"            # optional; with mqtts:// URLs
    aggregator_key = "ed25519:..."              # the aggregator's public key, or a .pub file

    [device]
    id = "pi-07"
    data = "/var/lib/fedprune/local.npz"        # or a .csv, or a folder of images (one per class)
    state_dir = "/var/lib/fedprune/state"
    label_column = "label"                      # a .csv's column of class ids
    trainer = "auto"                            # or "keras" (TensorFlow), "litert" (no TensorFlow)

    [budgets]
    max_train_memory_mb = 900
    max_round_s = 300

    [model]
    export = "int8"
    custom_layers = ["mypkg.layers:MyLayer"]    # optional: layer classes of your own
"""

from __future__ import annotations

import dataclasses
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fedprune.aggregator_key import KeyFileError, parse_aggregator_key
from fedprune.architecture import ArchitectureError, parse_custom_layer_spec
from fedprune.converters.signing import VerifyKey
from fedprune.converters.protocol import valid_device_id
from fedprune.data_files import DataOptions
from fedprune.edge_agent.budgets import Budgets
from fedprune.names import ID_RULE, valid_federation_id
from fedprune.tomlfile import coerce, read_toml
from fedprune.transport import BrokerAddress, parse_broker_url


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what to do."""


@dataclass(frozen=True)
class BrokerSection:
    url: str = ""  # mqtt://host:1883 or mqtts://host:8883
    username: str = ""
    password_file: str = ""  # a file that holds only the password (mode 600)
    ca_file: str = ""  # the CA that signed the broker's certificate (mqtts:// only)
    # The aggregator's public key ("ed25519:..." or the path of its aggregator.pub): the agent
    # accepts only messages it signed. Required to run.
    aggregator_key: str = ""
    federation: str = "default"
    max_payload_bytes: int = 1_000_000  # largest MQTT message sent; larger ones go in chunks
    max_message_bytes: int = 64_000_000  # largest whole message accepted


@dataclass(frozen=True)
class DeviceSection:
    id: str = ""
    data: str = ""  # .npz with x_train, y_train; a .csv; or a folder of images, one subfolder per class
    state_dir: str = ""  # default: fedprune-state/<id>
    label_column: str = "label"  # a .csv's column of class ids
    image_size: tuple[int, int] | None = None  # a folder of images: (height, width) to resize to
    color_mode: Literal["rgb", "grayscale"] = "rgb"  # a folder of images: 3 channels or 1
    # What trains: "keras" (TensorFlow in a child per round), "litert" (the aggregator's trainable
    # TFLite file in a TFLite runtime, no TensorFlow), "auto": keras where TensorFlow is installed,
    # else litert where a TFLite runtime is (fedprune.edge_agent.capabilities).
    trainer: Literal["auto", "keras", "litert"] = "auto"


@dataclass(frozen=True)
class BudgetsSection:
    max_train_memory_mb: float | None = None  # the training child's resident memory
    max_round_s: float | None = None  # training time per round; the child is stopped after it


@dataclass(frozen=True)
class ModelSection:
    # The global model as sparse TFLite: each round's (exported by a Keras device) and the final
    # one the aggregator publishes after the last round (installed by every device); "off": neither.
    export: Literal["int8", "float32", "off"] = "int8"
    # Layer classes of one's own that an architecture may use, as "package.module:ClassName": the
    # only way besides Keras's built-in layers (fedprune.architecture); imported when a model is built.
    custom_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoggingSection:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@dataclass(frozen=True)
class AgentConfig:
    broker: BrokerSection = field(default_factory=BrokerSection)
    device: DeviceSection = field(default_factory=DeviceSection)
    budgets: BudgetsSection = field(default_factory=BudgetsSection)
    model: ModelSection = field(default_factory=ModelSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    source: str = ""  # the file it came from, for messages

    # --- derived ---
    @property
    def state_dir(self) -> Path:
        return Path(self.device.state_dir or f"fedprune-state/{self.device.id}")

    @property
    def data_options(self) -> DataOptions:
        """How ``device.data`` is read (the aggregator's task reads its held-out set alike)."""
        return DataOptions(self.device.label_column, self.device.image_size, self.device.color_mode)

    @property
    def budget_limits(self) -> Budgets:
        return Budgets(self.budgets.max_train_memory_mb, self.budgets.max_round_s)

    def verify_key(self) -> VerifyKey:
        """The aggregator's public key (``broker.aggregator_key``); ConfigError when it is unusable."""
        where = f"{self.source}: " if self.source else ""
        try:
            return parse_aggregator_key(self.broker.aggregator_key)
        except KeyFileError as e:
            raise ConfigError(f"{where}broker.aggregator_key: {e}") from None

    def broker_url(self) -> str:
        """The broker URL with the credentials of ``username``/``password_file`` (and ``ca_file``).

        Holds the password: hand it to the MQTT session, never to a log.
        """
        url = self.broker.url
        if self.broker.username:
            password = _read_password(self.broker.password_file) if self.broker.password_file else None
            credentials = quote(self.broker.username, safe="") + (f":{quote(password, safe='')}" if password else "")
            scheme, rest = url.split("://", 1)
            url = f"{scheme}://{credentials}@{rest}"
        if self.broker.ca_file:
            url += ("&" if "?" in url else "?") + "ca=" + quote(self.broker.ca_file, safe="/")
        return url

    # --- checks ---
    def check(self, *, require_run: bool = True) -> "AgentConfig":
        """Validate values; ``require_run`` also demands what running needs (url, id, data)."""
        where = f"{self.source}: " if self.source else ""
        if require_run:
            for key, value in (("broker.url", self.broker.url), ("device.id", self.device.id),
                               ("device.data", self.device.data)):
                if not value:
                    raise ConfigError(f"{where}{key} is required (in the config file or as a flag)")
            if not self.broker.aggregator_key:
                raise ConfigError(f"{where}broker.aggregator_key is required: the agent accepts only messages "
                                  "the aggregator signed. Give --aggregator-key with the key fedprune-aggregator "
                                  "prints at start (also in its aggregator.pub), or use the connection file "
                                  "init-broker wrote (--connection)")
        if self.broker.aggregator_key.strip().startswith("ed25519:"):
            self.verify_key()  # a .pub file is read when the agent starts (verify_key)
        if self.broker.url:
            try:
                address = parse_broker_url(self.broker.url)
            except ValueError as e:
                raise ConfigError(f"{where}broker.url: {e}") from None
            if address.username or address.password:
                raise ConfigError(f"{where}broker.url must not hold credentials: use broker.username and "
                                  "broker.password_file (a file readable by the agent only)")
            if self.broker.ca_file and not address.tls:
                raise ConfigError(f"{where}broker.ca_file needs a TLS URL (mqtts://), got {self.broker.url}")
        if self.device.image_size is not None and not all(1 <= d <= 4096 for d in self.device.image_size):
            raise ConfigError(f"{where}device.image_size must be [height, width] in pixels, 1-4096 each")
        if self.device.id and not valid_device_id(self.device.id):
            raise ConfigError(f"{where}device.id {self.device.id!r} must be {ID_RULE}")
        if not valid_federation_id(self.broker.federation):
            raise ConfigError(f"{where}broker.federation {self.broker.federation!r} must be {ID_RULE}")
        if self.broker.password_file and not self.broker.username:
            raise ConfigError(f"{where}broker.password_file is set but broker.username is not")
        for key, path in (("broker.password_file", self.broker.password_file),
                          ("broker.ca_file", self.broker.ca_file)):
            if path and not Path(path).is_file():
                raise ConfigError(f"{where}{key}: no such file {path}")
        if self.broker.ca_file and "ca_file" not in {f.name for f in dataclasses.fields(BrokerAddress)}:
            raise ConfigError(f"{where}broker.ca_file: this version's MQTT transport verifies brokers against "
                              "the system's CAs only; add the CA to the system store and drop ca_file")
        for spec in self.model.custom_layers:
            try:
                parse_custom_layer_spec(spec)
            except ArchitectureError as e:
                raise ConfigError(f"{where}model.custom_layers: {e}") from None
        for key in ("max_payload_bytes", "max_message_bytes"):
            if getattr(self.broker, key) < 1024:
                raise ConfigError(f"{where}broker.{key} must be >= 1024, got {getattr(self.broker, key)}")
        for key in ("max_train_memory_mb", "max_round_s"):
            value = getattr(self.budgets, key)
            if value is not None and not value > 0:
                raise ConfigError(f"{where}budgets.{key} must be > 0 (leave it out for no limit), got {value}")
        return self

    def with_overrides(self, overrides: dict[str, Any]) -> "AgentConfig":
        """A copy with ``{"section.key": value}`` replaced (None values are skipped)."""
        config = self
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, key = dotted.split(".")
            config = dataclasses.replace(
                config, **{section: dataclasses.replace(getattr(config, section), **{key: value})})
        return config


def load_config(path: str | Path) -> AgentConfig:
    """Read a config file; paths in it are used as written (absolute ones are best)."""
    return parse_config(read_toml(path, "config file", ConfigError), source=str(path))


def parse_config(raw: dict[str, Any], source: str = "") -> AgentConfig:
    """Build an ``AgentConfig`` from parsed TOML, refusing unknown keys and wrong types."""
    where = f"{source}: " if source else ""
    sections = {f.name: f for f in dataclasses.fields(AgentConfig) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"{where}unknown section [{name}]; expected one of {sorted(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}{name!r} must be a table ([{name}])")
        cls = typing.get_type_hints(AgentConfig)[name]
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        section: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{where}unknown key '{name}.{key}'; expected one of {sorted(known)}")
            section[key] = coerce(value, hints[key], f"{where}{name}.{key}", ConfigError)
        kwargs[name] = cls(**section)
    return AgentConfig(**kwargs, source=source)


def _read_password(path: str) -> str:
    p = Path(path)
    try:
        mode = p.stat().st_mode
        password = p.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ConfigError(f"broker.password_file: cannot read {p}: {e.strerror or e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"broker.password_file {p} is readable by other users; chmod 600 {p}")
    if not password:
        raise ConfigError(f"broker.password_file {p} is empty")
    return password
