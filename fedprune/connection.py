"""Connection files: how one device (or the aggregator) reaches a secured broker.

``fedprune-aggregator init-broker`` writes one per device and one for the aggregator; the agent
reads its file with ``fedprune-agent --connection FILE`` and the aggregator with
``fedprune-aggregator --connection FILE``. A file holds a password: it is written readable by its
owner only, and must be copied to its device by a private channel.

    # fedprune connection for device pi-01
    role = "device"
    federation = "clinic"
    device_id = "pi-01"
    aggregator_key = "ed25519:..."   # the only key whose signed messages the device accepts

    [broker]
    url = "mqtts://laptop.local:8883"
    username = "pi-01"
    password = "..."
    ca_file = "ca.crt"          # relative to this file's folder, or absolute

The aggregator's file has ``signing_key = "aggregator.key"`` (relative to its folder) instead of
``device_id`` and ``aggregator_key``: the private key it signs every message to devices with.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedprune.converters.protocol import valid_device_id
from fedprune.converters.signing import VerifyKey
from fedprune.fileio import atomic_write_bytes
from fedprune.names import ID_RULE, valid_federation_id
from fedprune.transport import BrokerAddress, parse_broker_url

ROLES = ("device", "aggregator")


class ConnectionFileError(ValueError):
    """A connection file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Connection:
    role: str
    federation: str
    broker: BrokerAddress
    device_id: str | None = None  # devices only
    aggregator_key: str | None = None  # devices only: the aggregator's public key, "ed25519:..."
    signing_key: str | None = None  # the aggregator only: its private key file (absolute once loaded)


def load_connection(path: str | Path) -> Connection:
    """Read and check a connection file; raises ConnectionFileError naming what is wrong."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConnectionFileError(f"cannot read connection file {p}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConnectionFileError(f"connection file {p} is not valid TOML: {e}") from None

    def text(table: dict, key: str, where: str, required: bool = True) -> str | None:
        value = table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise ConnectionFileError(f"connection file {p}: {where}{key} must be a non-empty string")
        return value

    unknown = set(raw) - {"role", "federation", "device_id", "aggregator_key", "signing_key", "broker"}
    broker = raw.get("broker")
    if unknown:
        raise ConnectionFileError(f"connection file {p}: unknown keys {sorted(unknown)}")
    if not isinstance(broker, dict):
        raise ConnectionFileError(f"connection file {p}: a [broker] table with url, username, password is needed")
    unknown = set(broker) - {"url", "username", "password", "ca_file"}
    if unknown:
        raise ConnectionFileError(f"connection file {p}: unknown keys in [broker]: {sorted(unknown)}")
    role = text(raw, "role", "")
    if role not in ROLES:
        raise ConnectionFileError(f"connection file {p}: role must be one of {ROLES}, not {role!r}")
    device_id = text(raw, "device_id", "", required=role == "device")
    ca_file = text(broker, "ca_file", "broker.", required=False)
    if ca_file is not None:
        ca_file = str((p.parent / ca_file).resolve())
    try:
        address = parse_broker_url(text(broker, "url", "broker."), username=text(broker, "username", "broker."),
                                   password=text(broker, "password", "broker."), ca_file=ca_file)
    except ValueError as e:
        raise ConnectionFileError(f"connection file {p}: broker.url: {e}") from None
    federation = text(raw, "federation", "")
    if not valid_federation_id(federation):
        raise ConnectionFileError(f"connection file {p}: federation {federation!r} must be {ID_RULE}")
    if device_id is not None and not valid_device_id(device_id):
        raise ConnectionFileError(f"connection file {p}: device_id {device_id!r} must be {ID_RULE}")
    aggregator_key, signing_key = _key_of_role(raw, role, p)
    return Connection(role, federation, address, device_id, aggregator_key, signing_key)


# Each role's key: (the key, what it is). A device holds the aggregator's public key, the
# aggregator the file of its private key.
_ROLE_KEYS = {"device": ("aggregator_key", "the aggregator's public key"),
              "aggregator": ("signing_key", "the file of the aggregator's signing key")}


def _key_of_role(raw: dict, role: str, p: Path) -> tuple[str | None, str | None]:
    """(aggregator_key, signing_key) of a connection file, the other one None; ConnectionFileError
    for a missing, misplaced or malformed key."""
    key_name, what = _ROLE_KEYS[role]
    for other_role, (other, _) in _ROLE_KEYS.items():
        if other_role != role and other in raw:
            raise ConnectionFileError(f"connection file {p}: {other} belongs in the {other_role}'s connection file, "
                                      f"not a {role}'s")
    value = raw.get(key_name)
    if value is None:
        raise ConnectionFileError(f"connection file {p}: no {key_name} ({what}); it was written before signed "
                                  "messages (protocol version 2): write a new set-up with "
                                  "fedprune-aggregator init-broker")
    if not isinstance(value, str) or not value:
        raise ConnectionFileError(f"connection file {p}: {key_name} must be a non-empty string")
    if role == "aggregator":
        return None, str((p.parent / value).resolve())
    try:
        VerifyKey.from_text(value)
    except ValueError as e:
        raise ConnectionFileError(f"connection file {p}: aggregator_key: {e}") from None
    return value, None


def write_connection(path: str | Path, connection: Connection) -> Path:
    """Write ``connection`` as a TOML file readable by its owner only; ``ca_file`` is stored
    relative to the file's folder when it lies inside it."""
    p = Path(path)
    b = connection.broker
    ca = None if b.ca_file is None else _relative(b.ca_file, p)
    who = f"device {connection.device_id}" if connection.role == "device" else "the aggregator"
    lines = [f"# fedprune connection for {who}. It holds a password: keep it private.",
             f"role = {_quote(connection.role)}", f"federation = {_quote(connection.federation)}"]
    if connection.device_id is not None:
        lines.append(f"device_id = {_quote(connection.device_id)}")
    if connection.aggregator_key is not None:
        lines.append(f"aggregator_key = {_quote(connection.aggregator_key)}")
    if connection.signing_key is not None:
        lines.append(f"signing_key = {_quote(_relative(connection.signing_key, p))}")
    lines += ["", "[broker]", f"url = {_quote(b.url)}", f"username = {_quote(b.username or '')}",
              f"password = {_quote(b.password or '')}"]
    if ca is not None:
        lines.append(f"ca_file = {_quote(ca)}")
    atomic_write_bytes(p, ("\n".join(lines) + "\n").encode(), mode=0o600)
    return p


def _relative(path: str, connection_file: Path) -> str:
    """``path`` relative to the connection file's folder when it lies inside it, else absolute."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(connection_file.parent.resolve()))
    except ValueError:
        return str(resolved)


def _quote(value: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML for the characters used here)."""
    return json.dumps(value, ensure_ascii=False)
