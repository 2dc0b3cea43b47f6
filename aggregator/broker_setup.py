"""``fedprune-aggregator init-broker``: a production broker set-up for one federation, in a folder.

    fedprune-aggregator init-broker --out broker --federation clinic --host laptop.local \\
        --devices pi-01 pi-02 pi-03

writes (private keys and passwords readable by their owner only):

    ca.crt, ca.key           a new certificate authority (the key only re-signs server.crt)
    server.crt, server.key   the broker's TLS certificate for the --host names and addresses
    passwd                   one credential per device and one for the aggregator, hashed by
                             Mosquitto's own mosquitto_passwd
    acl                      what each may read and write (fedprune.aggregator.access)
    mosquitto.conf           a TLS-only listener with the files above: mosquitto -c broker/mosquitto.conf
    aggregator.toml          the aggregator's connection file (fedprune-aggregator --connection)
    aggregator.key           the aggregator's Ed25519 signing key: it signs every message to devices
    aggregator.pub           its public key, also written into every device's connection.toml
    devices/<id>/            per device: connection.toml and ca.crt, to copy to that device
                             (fedprune-agent --connection connection.toml)
    fedprune-broker.toml     what was set up, for ``fedprune-aggregator --broker-dir`` (the
                             embedded broker enforces the same logins and policy)
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import pwd
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedprune.aggregator.access import AccessPolicy
from fedprune.aggregator.embedded_broker import BrokerSecurity
from fedprune.aggregator.passwords import write_password_file
from fedprune.aggregator_key import write_key_pair
from fedprune.converters.protocol import valid_device_id
from fedprune.connection import Connection, write_connection
from fedprune.fileio import atomic_write_bytes
from fedprune.names import ID_RULE, valid_federation_id
from fedprune.transport import BrokerAddress

log = logging.getLogger(__name__)

AGGREGATOR_USER = "fedprune-aggregator"
MANIFEST = "fedprune-broker.toml"
# The task file's transport.max_payload_bytes: Mosquitto forwards no larger payload
# (message_size_limit), and takes no packet larger than that plus room for the topic and headers.
MAX_PAYLOAD_BYTES = 1_000_000
PACKET_HEADROOM = 65_536 + 16  # a topic of up to 65,535 bytes, its length, the fixed header, a packet id
# Per client (in practice the aggregator's, which subscribes to every device's update). A device
# that floods its update topic faster than the aggregator drains it fills this queue; past either
# bound Mosquitto drops messages to the aggregator without a word, honest updates among them. Sized
# so a flood of a million small messages is queued, not dropped (docs/benchmarks.md, "Trust
# boundaries (issue 16)").
MAX_QUEUED_MESSAGES = 2_000_000
MAX_QUEUED_BYTES = 1_000_000_000
# QoS 1 messages in flight to a client before Mosquitto waits for its acknowledgements: a deeper
# pipeline to the aggregator drains its queue faster than Mosquitto's default of 20.
MAX_INFLIGHT_MESSAGES = 1000


class BrokerSetupError(ValueError):
    """The set-up cannot be written or read; the message says what to change."""


@dataclass(frozen=True)
class BrokerFolder:
    """A folder written by :func:`init_broker`."""

    path: Path
    federation: str
    port: int
    devices: tuple[str, ...]
    aggregator_user: str = AGGREGATOR_USER

    @property
    def ca_file(self) -> Path:
        return self.path / "ca.crt"

    @property
    def mosquitto_conf(self) -> Path:
        return self.path / "mosquitto.conf"

    @property
    def aggregator_connection(self) -> Path:
        return self.path / "aggregator.toml"

    def device_connection(self, device_id: str) -> Path:
        return self.path / "devices" / device_id / "connection.toml"

    def security(self) -> BrokerSecurity:
        """What the embedded broker needs to enforce this set-up."""
        return BrokerSecurity(self.path / "passwd", self.federation, self.aggregator_user,
                              self.path / "server.crt", self.path / "server.key")


def _check_setup(out: Path, federation: str, devices: list[str], port: int, max_payload_bytes: int) -> None:
    """BrokerSetupError naming what makes the set-up unusable: the federation id, the device ids,
    the port, the payload limit, or a folder that already holds one."""
    if not valid_federation_id(federation):
        raise BrokerSetupError(f"federation id {federation!r} must be {ID_RULE}")
    if not devices:
        raise BrokerSetupError("no devices: name them with --devices or give --device-count")
    bad = [d for d in devices if not valid_device_id(d) or d == AGGREGATOR_USER or ":" in d]
    if bad:
        raise BrokerSetupError(f"device ids {bad} are not usable (1-128 printable characters without / + # :, "
                               f"and not {AGGREGATOR_USER!r})")
    if len(set(devices)) != len(devices):
        raise BrokerSetupError("device ids repeat: each device needs its own id")
    if not 0 < port < 65536:
        raise BrokerSetupError(f"port {port} is not in 1..65535")
    if not 1024 <= max_payload_bytes <= 256 * 1024 * 1024:
        raise BrokerSetupError(f"--max-payload-bytes must be in [1024, 268435456] (the task file's "
                               f"transport.max_payload_bytes), got {max_payload_bytes}")
    if (out / MANIFEST).exists():
        raise BrokerSetupError(f"{out} already holds a broker set-up; choose a new folder (its CA and passwords "
                               "would be replaced, and every device would need new files)")


def init_broker(
    out: str | Path,
    federation: str,
    devices: list[str],
    hosts: list[str],
    *,
    port: int = 8883,
    bind: str = "0.0.0.0",
    persistence: bool = True,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> BrokerFolder:
    """Write the set-up described in the module docstring into ``out`` (which must not hold one).
    ``max_payload_bytes``: the task file's ``transport.max_payload_bytes``, which the broker enforces."""
    out = Path(out).resolve()
    _check_setup(out, federation, devices, port, max_payload_bytes)
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))

    ca_key, ca_cert = _make_ca(federation)
    server_key, server_cert = _make_server_cert(ca_key, ca_cert, names)
    _write_pem(out / "ca.key", _key_pem(ca_key), private=True)
    _write_pem(out / "ca.crt", _cert_pem(ca_cert))
    _write_pem(out / "server.key", _key_pem(server_key), private=True)
    _write_pem(out / "server.crt", _cert_pem(server_cert))

    credentials = {AGGREGATOR_USER: secrets.token_urlsafe(24), **{d: secrets.token_urlsafe(24) for d in devices}}
    write_password_file(out / "passwd", credentials)
    policy = AccessPolicy(federation, AGGREGATOR_USER)
    atomic_write_bytes(out / "acl", policy.mosquitto_acl().encode())
    if persistence:
        (out / "data").mkdir(exist_ok=True)
    atomic_write_bytes(out / "mosquitto.conf",
                       mosquitto_config(out, port, bind, persistence, max_payload_bytes).encode())

    public_host = hosts[0] if hosts else "localhost"
    url_host = f"[{public_host}]" if ":" in public_host else public_host

    def address(user: str, ca: Path) -> BrokerAddress:
        return BrokerAddress(public_host, port, tls=True, username=user, password=credentials[user], ca_file=str(ca))

    signing_key = write_key_pair(out / "aggregator.key")
    write_connection(out / "aggregator.toml",
                     Connection("aggregator", federation, address(AGGREGATOR_USER, out / "ca.crt"),
                                signing_key=str(out / "aggregator.key")))
    folder = BrokerFolder(out, federation, port, tuple(devices))
    for d in devices:
        device_dir = out / "devices" / d
        _write_pem(device_dir / "ca.crt", _cert_pem(ca_cert))
        write_connection(folder.device_connection(d),
                         Connection("device", federation, address(d, device_dir / "ca.crt"), device_id=d,
                                    aggregator_key=signing_key.public.text))
    manifest = "\n".join([
        "# written by fedprune-aggregator init-broker",
        f"federation = {json.dumps(federation)}", f"port = {port}", f"url = {json.dumps(f'mqtts://{url_host}:{port}')}",
        f"aggregator_user = {json.dumps(AGGREGATOR_USER)}", f"devices = {json.dumps(devices)}", "",
    ])
    atomic_write_bytes(out / MANIFEST, manifest.encode())
    log.info("broker set-up for federation %r with %d devices written to %s", federation, len(devices), out)
    return folder


def load_broker_folder(path: str | Path) -> BrokerFolder:
    """A folder written by :func:`init_broker`; BrokerSetupError when it is not one."""
    path = Path(path).resolve()
    try:
        raw = tomllib.loads((path / MANIFEST).read_text(encoding="utf-8"))
        folder = BrokerFolder(path, str(raw["federation"]), int(raw["port"]), tuple(raw["devices"]),
                              str(raw["aggregator_user"]))
    except FileNotFoundError:
        raise BrokerSetupError(f"{path} holds no {MANIFEST}: write it with fedprune-aggregator init-broker") from None
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise BrokerSetupError(f"{path / MANIFEST} is damaged ({type(e).__name__}: {e}); write a new set-up") from None
    missing = [n for n in ("passwd", "server.crt", "server.key", "ca.crt") if not (path / n).is_file()]
    if missing:
        raise BrokerSetupError(f"{path} lacks {missing}; write a new set-up with fedprune-aggregator init-broker")
    return folder


def mosquitto_config(out: Path, port: int, bind: str, persistence: bool,
                     max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> str:
    lines = [
        "# Mosquitto 2 configuration written by fedprune-aggregator init-broker.",
        "# Run: mosquitto -c " + str(out / "mosquitto.conf"),
        "# Started as root, Mosquitto drops to the account named by `user` (by default `mosquitto`, which cannot",
        "# read the private files here, mode 600). This one is their owner, who wrote the set-up (root stays root).",
        "# To run it as a service under its own account: chown -R mosquitto: this folder, and `user mosquitto`.",
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        "",
        "# TLS only: no plain-text listener.",
        f"listener {port} {bind}",
        f"cafile {out / 'ca.crt'}",
        f"certfile {out / 'server.crt'}",
        f"keyfile {out / 'server.key'}",
        "tls_version tlsv1.2",
        "# A client's id is its login: no one can take over another client's session (or drop it) by",
        "# connecting with its client id. One connection per login: give a monitoring tool a login of its own.",
        "# (A listener option: above the listener line it would open a second listener on port 1883.)",
        "use_username_as_clientid true",
        "",
        "# The task file's transport.max_payload_bytes: larger fedprune messages travel in chunks, so",
        "# a larger payload is no fedprune message and is never forwarded.",
        f"message_size_limit {max_payload_bytes}",
        f"max_packet_size {max_payload_bytes + PACKET_HEADROOM}",
        "# Per client, in practice the aggregator's: a device flooding its update topic faster than the",
        "# aggregator drains it fills this queue, and past it Mosquitto drops messages to the aggregator",
        "# (honest updates among them) without a word. The default 1000 dropped them within a second of a",
        "# flood; these hold a million small messages (docs/benchmarks.md, Trust boundaries), and the",
        "# byte bound keeps a flood of large ones from filling the broker's memory and its saved database.",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        "sys_interval 0",
    ]
    if persistence:
        lines += ["# Retained tasks and the aggregator's session survive a broker restart.",
                  "persistence true", f"persistence_location {out / 'data'}/", "autosave_interval 60"]
    else:
        lines.append("persistence false")
    return "\n".join(lines) + "\n"


# --- certificates ----------------------------------------------------------------------------------


def _make_ca(federation: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedprune CA for {federation}"[:64])])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _make_server_cert(ca_key, ca_cert, names: list[str]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write_pem(path: Path, data: bytes, private: bool = False) -> None:
    atomic_write_bytes(path, data, mode=0o600 if private else 0o644)


# --- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(
        prog="fedprune-aggregator init-broker",
        description="Write a TLS Mosquitto set-up with one credential per device and a per-device ACL.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write (must not hold a set-up)")
    parser.add_argument("--federation", default="default", help="federation id, as in the task file (default 'default')")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--devices", nargs="+", metavar="ID", help="device ids, one credential each")
    who.add_argument("--device-count", type=int, metavar="N", help="N devices named <prefix>01 ... ")
    parser.add_argument("--device-prefix", default="device-", help="prefix for --device-count (default 'device-')")
    parser.add_argument("--host", action="append", default=[],
                        help="name or address devices use to reach the broker; repeat for several (the first "
                             "goes into the connection files). localhost and 127.0.0.1 are always included")
    parser.add_argument("--port", type=int, default=8883, help="TLS port (default 8883)")
    parser.add_argument("--bind", default="0.0.0.0", help="address Mosquitto listens on (default 0.0.0.0)")
    parser.add_argument("--max-payload-bytes", type=int, default=MAX_PAYLOAD_BYTES,
                        help="the task file's transport.max_payload_bytes, which Mosquitto then enforces "
                             f"(message_size_limit; default {MAX_PAYLOAD_BYTES:,})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    devices = args.devices or [f"{args.device_prefix}{i:02d}" for i in range(1, (args.device_count or 0) + 1)]
    try:
        folder = init_broker(args.out, args.federation, devices, args.host, port=args.port, bind=args.bind,
                             max_payload_bytes=args.max_payload_bytes)
    except (BrokerSetupError, RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the broker set-up for federation '{folder.federation}' to {folder.path}")
    print(f"  broker:      mosquitto -c {folder.mosquitto_conf}")
    print(f"  aggregator:  fedprune-aggregator --task TASK --connection {folder.aggregator_connection}")
    print(f"  each device: copy {folder.path / 'devices' / '<id>'}/ to it, then "
          "fedprune-agent --connection connection.toml --data DATA.npz")
    return 0
