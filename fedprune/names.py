"""What names read from files may be: federation ids (one MQTT topic level, as device ids are) and
``"module:name"`` references to code in local configuration (a task's model factory, a device's
custom layers).

Checked where they are parsed, before they reach a topic or an import: a federation id with a
newline used to fail later as a misleading "no connection", and ``factory = "os:system"`` was
imported and called before anything looked at it.
"""

from __future__ import annotations

import re
import sys

from fedprune.converters.protocol import valid_device_id

ID_RULE = "1-128 bytes of printable characters without '/', '+', '#' (one MQTT topic level)"
_IMPORT_SPEC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def valid_federation_id(federation: object) -> bool:
    """Whether ``federation`` can name a federation: the rule for device ids (``ID_RULE``)."""
    return isinstance(federation, str) and valid_device_id(federation)


def parse_import_spec(spec: object, what: str) -> tuple[str, str]:
    """``"package.module:name"`` as (module, name), checked by form only: nothing is imported.

    Refused: anything but dotted identifiers and one colon, private names (a leading ``_``), and
    modules of Python's standard library (``os:system``, ``builtins:exec``, ``subprocess:run``):
    code a task or a config names must be the user's own. ``ValueError`` names ``what`` it was.
    """
    if not isinstance(spec, str) or not _IMPORT_SPEC.match(spec):
        raise ValueError(f"{what} {spec!r} must look like 'package.module:name'")
    module, _, name = spec.partition(":")
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        raise ValueError(f"{what} {spec!r} names Python's standard library ({top}); name your own code")
    if name.startswith("_") or any(part.startswith("_") for part in module.split(".")):
        raise ValueError(f"{what} {spec!r} names a private module or attribute")
    return module, name
