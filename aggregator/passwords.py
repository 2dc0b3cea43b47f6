"""Mosquitto password files: written by Mosquitto's own ``mosquitto_passwd``, read by both brokers.

Mosquitto 2 stores ``username:$7$ITERATIONS$SALT$HASH`` with PBKDF2-HMAC-SHA512 (base64 salt
and derived key). The embedded broker verifies the same file with :func:`verify_password`, so one
credential store serves both brokers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import shutil
import subprocess
from pathlib import Path

from fedprune.fileio import atomic_write_bytes

_MOSQUITTO_PASSWD_PATHS = ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd")


class PasswordFileError(RuntimeError):
    """The password file cannot be written or read."""


def mosquitto_passwd_path() -> str | None:
    found = shutil.which("mosquitto_passwd")
    if found:
        return found
    return next((p for p in _MOSQUITTO_PASSWD_PATHS if Path(p).is_file()), None)


def write_password_file(path: str | Path, credentials: dict[str, str]) -> Path:
    """Write ``credentials`` (username -> password) as a Mosquitto password file, hashed by
    ``mosquitto_passwd -U`` (the clear text never appears on a command line)."""
    tool = mosquitto_passwd_path()
    if tool is None:
        raise PasswordFileError("mosquitto_passwd was not found: it hashes the password file. Install Mosquitto "
                                "(Debian/Raspberry Pi OS: sudo apt-get install mosquitto)")
    for user, password in credentials.items():
        if not user or ":" in user or "\n" in user:
            raise PasswordFileError(f"username {user!r} cannot go in a password file (empty, ':' or newline)")
        if not password or ":" in password or "\n" in password:  # mosquitto_passwd -U cuts at a second ':'
            raise PasswordFileError(f"the password of {user!r} cannot go in a password file (empty, ':' or newline)")
    path = Path(path)
    clear = "".join(f"{user}:{password}\n" for user, password in credentials.items())
    atomic_write_bytes(path, clear.encode(), mode=0o600)
    try:
        proc = subprocess.run([tool, "-U", str(path)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        path.unlink(missing_ok=True)
        raise PasswordFileError(f"{tool} -U {path} failed: {e}") from None
    if proc.returncode != 0:
        path.unlink(missing_ok=True)  # never leave clear-text passwords behind
        raise PasswordFileError(f"{tool} -U {path} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    hashed = read_password_file(path)
    if set(hashed) != set(credentials) or not all(verify_password(hashed[u], p) for u, p in credentials.items()):
        path.unlink(missing_ok=True)
        raise PasswordFileError(f"{tool} wrote {path} in a format fedprune cannot verify (expected $7$ hashes)")
    return path


def read_password_file(path: str | Path) -> dict[str, str]:
    """username -> stored hash; blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PasswordFileError(f"cannot read password file {path}: {e.strerror or e}") from None
    users = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user:
            raise PasswordFileError(f"password file {path}, line {n}: expected username:hash")
        users[user] = stored
    return users


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches a Mosquitto 2 ``$7$`` hash (constant-time comparison)."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt, expected = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except (ValueError, binascii.Error):
        return False
    if not 1 <= iterations <= 10_000_000 or not expected:
        return False
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=len(expected))
    return hmac.compare_digest(derived, expected)
