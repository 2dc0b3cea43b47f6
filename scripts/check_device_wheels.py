#!/usr/bin/env python3
"""Does each device extra install from wheels alone on each board? A pip dry run per platform.

For every target (Linux x86_64, aarch64 and armv7l; Python 3.10-3.13) and every device extra
(``agent``, ``agent-lite``, ``inference`` by default), this script

1. reads the extras from ``pyproject.toml`` (``--pyproject`` names another),
2. evaluates their environment markers **for the target** with ``packaging.markers`` (pip's
   ``--platform``/``--python-version`` do *not* change the markers pip evaluates: it evaluates
   them against the interpreter that runs it, e.g. ``platform_machine == 'x86_64'`` on this host;
   see :func:`pip_marker_environment`), and
3. runs ``pip install --dry-run --ignore-installed --only-binary=:all: --python-version X.Y
   --platform TAG ... --report -`` with the concrete requirements, naming every platform tag pip
   accepts on that board (pip does not widen ``--platform manylinux_2_28_aarch64`` to the older
   ``manylinux_2_27``/``manylinux_2_17`` tags a real board accepts, so each is passed).

On armv7l, NumPy is Debian's ``python3-numpy`` 1.24.2 and cffi (which cryptography needs) Debian's
``python3-cffi`` 1.15.1 (no NumPy or cffi wheel exists for armv7l; the venv is made with
``--system-site-packages``): a metadata-only stand-in wheel of each version is offered to pip, so a
requirement that version cannot satisfy still fails.

Prints a table and, last, one JSON line: ``{"results": [{"platform", "python", "extra", "ok",
"packages" | "error"}, ...], ...}``. Exit status 0 when every expected combination resolved.

    python scripts/check_device_wheels.py                       # pyproject.toml's extras
    python scripts/check_device_wheels.py --packages            # which versions exist per platform
    python scripts/check_device_wheels.py --legacy-tags         # only manylinux2014/_2_17/_2_28 (the old check)
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import Tag, cpython_tags, compatible_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = "fedprune"
INDEX_URL = "https://pypi.org/simple"
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
DEVICE_EXTRAS = ("agent", "agent-lite", "inference")
#: The packages whose versions the table shows.
KEY_PACKAGES = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert", "tflite-runtime",
                "numpy", "paho-mqtt", "zstandard", "cryptography")
SHORT = {"tensorflow": "tf", "tf-keras": "tf-keras", "tensorflow-model-optimization": "tfmot",
         "ai-edge-litert": "litert", "tflite-runtime": "tflite-rt", "numpy": "numpy", "paho-mqtt": "paho",
         "zstandard": "zstd", "cryptography": "crypto"}

#: glibc of the boards: Raspberry Pi OS Bookworm (Debian 12, Python 3.11) has 2.36; the newer
#: Raspberry Pi OS on Debian 13 (Trixie, Python 3.13) has 2.41. Other Python versions are
#: checked against Bookworm's glibc (the stricter of the two).
GLIBC_BY_PYTHON = {"3.13": (2, 41)}
DEFAULT_GLIBC = (2, 36)

#: Debian's python3-numpy on Bookworm armhf, which the armv7l board uses (--system-site-packages).
DEBIAN_NUMPY = "1.24.2"
#: Debian's python3-cffi on Bookworm armhf: cryptography's armv7l wheels need cffi, which has no
#: armv7l wheel on PyPI (cryptography < 46, which accepts cffi 1.x, see pyproject.toml).
DEBIAN_CFFI = "1.15.1"


@dataclass(frozen=True)
class Target:
    """A board's platform as pip sees it: ``platform_machine`` and the wheel platform tags."""

    name: str
    machine: str  # platform.machine() on the board
    system_packages: dict[str, str] = field(default_factory=dict)  # from Debian, not from wheels

    def glibc(self, python: str) -> tuple[int, int]:
        return GLIBC_BY_PYTHON.get(python, DEFAULT_GLIBC)

    def platform_tags(self, python: str, legacy: bool = False) -> list[str]:
        """The platform tags pip accepts on this board, newest first (what ``pip debug --verbose``
        lists there): ``manylinux_2_<glibc>`` down to ``manylinux_2_17``, the legacy aliases,
        and ``linux_<machine>``. ``legacy``: only the three tags earlier checks named."""
        arch = self.machine
        if legacy:
            return [f"manylinux_2_17_{arch}", f"manylinux2014_{arch}", f"manylinux_2_28_{arch}"]
        major, minor = self.glibc(python)
        lowest = 5 if arch == "x86_64" else 17  # manylinux1 (glibc 2.5) exists for x86_64 only
        tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, lowest - 1, -1)]
        # The legacy names pip also accepts (PEP 600 aliases), as pip lists them.
        if arch == "x86_64":
            tags += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]
        else:
            tags += [f"manylinux2014_{arch}"]
        return tags + [f"linux_{arch}"]

    def marker_environment(self, python: str) -> dict[str, str]:
        """``packaging.markers`` environment of CPython ``python`` on this board."""
        full = f"{python}.0"
        return {
            "implementation_name": "cpython", "implementation_version": full, "os_name": "posix",
            "platform_machine": self.machine, "platform_python_implementation": "CPython",
            "platform_release": "", "platform_system": "Linux", "platform_version": "",
            "python_full_version": full, "python_version": python, "sys_platform": "linux",
        }

    def supported_tags(self, python: str) -> list[Tag]:
        """Every wheel tag CPython ``python`` accepts on this board, as pip orders them."""
        version = tuple(int(p) for p in python.split("."))
        platforms = self.platform_tags(python)
        return [*cpython_tags(version, platforms=platforms), *compatible_tags(version, platforms=platforms)]


TARGETS: dict[str, Target] = {
    "x86_64": Target("x86_64", "x86_64"),
    # 64-bit Raspberry Pi OS (Pi 3, 4, 5, Zero 2 W).
    "aarch64": Target("aarch64", "aarch64"),
    # 32-bit Raspberry Pi OS (armhf): NumPy and cffi come from Debian (python3-numpy, python3-cffi).
    "armv7l": Target("armv7l", "armv7l", {"numpy": DEBIAN_NUMPY, "cffi": DEBIAN_CFFI}),
}

#: Which (target, python) pairs each extra is expected to resolve on; the rest are reported but do
#: not fail the check (no wheel exists for them on PyPI: see the table's errors).
EXPECTED_UNSUPPORTED = {
    # No runtime has armv7l wheels for Python 3.12+ (tflite-runtime 2.14 stops at cp311), and no
    # TensorFlow at all for armv7l.
    ("armv7l", "3.12"), ("armv7l", "3.13"),
}

# --------------------------------------------------------------------------------------------
# Requirements of an extra, for a target
# --------------------------------------------------------------------------------------------


def load_project(pyproject: Path | None = None) -> dict:
    """``[project]`` of pyproject.toml (this repository's by default)."""
    return tomllib.loads((pyproject or REPO / "pyproject.toml").read_text())["project"]


def requirements_for(project: dict, extra: str | None, environment: dict[str, str]) -> list[Requirement]:
    """The concrete requirements (markers evaluated for ``environment``, markers dropped) of
    ``pip install "<project>[extra]"``: base dependencies plus the extra's, following the
    project's references to its own extras (``fedprune[inference]``). Requirements of the same
    name are kept separately (pip intersects their specifiers)."""
    name = canonicalize_name(project["name"])
    extras_table = {canonicalize_name(k): v for k, v in project.get("optional-dependencies", {}).items()}
    out: list[Requirement] = []
    seen: set[str | None] = set()

    def visit(strings: list[str], current: str | None) -> None:
        for text in strings:
            req = Requirement(text)
            env = {**environment, "extra": current or ""}
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if canonicalize_name(req.name) == name:
                for sub in sorted(req.extras):
                    add(canonicalize_name(sub))
                continue
            req.marker = None
            out.append(req)

    def add(which: str | None) -> None:
        if which in seen:
            return
        seen.add(which)
        if which is None:
            visit(project.get("dependencies", []), None)
            return
        if which not in extras_table:
            raise KeyError(f"pyproject.toml has no extra {which!r}; it has {sorted(extras_table)}")
        visit(extras_table[which], which)

    add(None)
    if extra:
        add(canonicalize_name(extra))
    return out


def pip_marker_environment(python: str = sys.executable) -> dict[str, str]:
    """The marker environment pip evaluates requirement markers against, from a pip dry run's
    report (the ``environment`` key): that of the interpreter running pip, whatever
    ``--platform`` and ``--python-version`` say. Needs no network (no requirements)."""
    with tempfile.TemporaryDirectory() as tmp:  # pip needs a requirement: a local one that needs nothing
        wheel = stub_wheel(Path(tmp), "marker-probe", "1.0")
        out = subprocess.run([python, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed",
                              "--only-binary=:all:", "--python-version", "3.13", "--platform",
                              "manylinux_2_17_aarch64", "--no-index", "--report", "-", "-q", str(wheel)],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["environment"]


# --------------------------------------------------------------------------------------------
# pip
# --------------------------------------------------------------------------------------------


def stub_wheel(folder: Path, name: str, version: str) -> Path:
    """A metadata-only wheel ``name==version`` (py3-none-any): stands for a package the board
    gets from Debian, so that pip resolves the rest against that version."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                      "Summary: stands for the board's system package\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: check_device_wheels\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for arcname, text in files.items():
            data = text.encode()
            z.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arcname},sha256={digest},{len(data)}")
        record.append(f"{dist}.dist-info/RECORD,,")
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def pip_platform_args(target: Target, python: str, legacy: bool = False) -> list[str]:
    """``--only-binary=:all: --python-version X --implementation cp --platform ...`` for a board."""
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for tag in target.platform_tags(python, legacy):
        args += ["--platform", tag]
    return args


def pip_base_args() -> list[str]:
    """General options: ``pip --isolated`` (no config files or PIP_* variables, so only the index
    given to the command answers), with the certificate bundle of PIP_CERT/SSL_CERT_FILE kept and
    the cache in FEDPRUNE_PIP_CACHE if set."""
    args = ["--isolated", "--disable-pip-version-check"]
    cert = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if cert:
        args += ["--cert", cert]
    cache = os.environ.get("FEDPRUNE_PIP_CACHE")
    if cache:
        args += ["--cache-dir", cache]
    return args


def system_stand_ins(target: Target, requirements: list[Requirement], folder: Path) -> list[str]:
    """For each package the board takes from Debian: pip arguments that offer it (a stub wheel
    and ``name==version``), after checking that every requirement on it allows that version."""
    args: list[str] = []
    for name, version in target.system_packages.items():
        wanted = [r for r in requirements if canonicalize_name(r.name) == name]
        for r in wanted:
            if not r.specifier.contains(version, prereleases=True):
                raise ResolutionError(f"{r} cannot be met by the board's Debian {name} {version}")
        stub_wheel(folder, name, version)
        args += [f"{name}=={version}"]
    if args:
        args += ["--find-links", str(folder)]
    return args


class ResolutionError(RuntimeError):
    pass


@dataclass
class Resolution:
    platform: str
    python: str
    extra: str
    ok: bool
    requirements: list[str]
    packages: dict[str, str] = field(default_factory=dict)  # name -> version ("1.24.2 (system)")
    error: str = ""
    seconds: float = 0.0
    expected: bool = True  # expected to resolve

    def as_json(self) -> dict:
        out = {"platform": self.platform, "python": self.python, "extra": self.extra, "ok": self.ok,
               "expected": self.expected, "requirements": self.requirements}
        if self.ok:
            out["packages"] = self.packages
        else:
            out["error"] = self.error
        return out


def resolve(target: Target, python: str, requirements: list[Requirement], *, extra: str = "",
            legacy: bool = False, pip_python: str = sys.executable, index_url: str = INDEX_URL,
            timeout_s: float = 600) -> Resolution:
    """One ``pip install --dry-run --report`` for ``requirements`` on ``target`` / ``python``."""
    reqs = [str(r) for r in requirements]
    result = Resolution(target.name, python, extra, False, reqs,
                        expected=(target.name, python) not in EXPECTED_UNSUPPORTED)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedprune-wheels-") as tmp:
        try:
            system = system_stand_ins(target, requirements, Path(tmp))
        except ResolutionError as e:
            result.error = str(e)
            return result
        system_names = set(target.system_packages)
        to_pip = [r for r in reqs if canonicalize_name(Requirement(r).name) not in system_names]
        cmd = [pip_python, "-m", "pip", *pip_base_args(), "install", "--index-url", index_url, "--dry-run",
               "--ignore-installed",
               *pip_platform_args(target, python, legacy), "--report", "-", "-q", *system, *to_pip]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            result.error = f"pip did not finish within {timeout_s:.0f} s"
            return result
    result.seconds = round(time.monotonic() - start, 1)
    if proc.returncode != 0:
        result.error = _pip_error(proc.stderr)
        return result
    report = json.loads(proc.stdout)
    for item in report["install"]:
        name = canonicalize_name(item["metadata"]["name"])
        version = item["metadata"]["version"]
        if name in system_names and item["download_info"]["url"].startswith("file:"):
            version += " (system)"
        result.packages[name] = version
    result.ok = True
    return result


def _pip_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    picked = errors or lines[-3:]
    return " | ".join(picked)[:600] or "pip failed without a message"


# --------------------------------------------------------------------------------------------
# Which versions exist (PyPI's JSON API, wheel tags checked with packaging.tags)
# --------------------------------------------------------------------------------------------


def wheel_availability(packages: tuple[str, ...] = KEY_PACKAGES, pythons: tuple[str, ...] = PYTHONS,
                       targets: tuple[str, ...] = tuple(TARGETS), cache: Path | None = None) -> dict:
    """``{package: {target: {python: {"newest": v, "count": n, "tag": platform tag}}}}``: the
    newest non-yanked, non-pre-release version with a wheel the board accepts (tags of
    :meth:`Target.supported_tags`), from PyPI's JSON API."""
    out: dict = {}
    for package in packages:
        data = _pypi_json(package, cache)
        out[package] = {}
        for tname in targets:
            target = TARGETS[tname]
            out[package][tname] = {}
            for python in pythons:
                supported = {str(t): i for i, t in enumerate(target.supported_tags(python))}
                versions: dict[Version, str] = {}
                for version, files in data["releases"].items():
                    v = Version(version)
                    if v.is_prerelease:
                        continue
                    for f in files:
                        if f.get("yanked") or not f["filename"].endswith(".whl"):
                            continue
                        try:
                            _, _, _, tags = parse_wheel_filename(f["filename"])
                        except ValueError:
                            continue
                        hits = [str(t) for t in tags if str(t) in supported]
                        if hits:
                            versions[v] = min(hits, key=supported.get).split("-")[-1]
                if versions:
                    newest = max(versions)
                    out[package][tname][python] = {"newest": str(newest), "count": len(versions),
                                                   "tag": versions[newest]}
                else:
                    out[package][tname][python] = None
    return out


def _pypi_json(package: str, cache: Path | None) -> dict:
    if cache is not None:
        path = cache / f"{package}.json"
        if path.is_file() and time.time() - path.stat().st_mtime < 24 * 3600:
            return json.loads(path.read_text())
    with urllib.request.urlopen(f"https://pypi.org/pypi/{package}/json", timeout=60) as r:
        body = r.read()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{package}.json").write_bytes(body)
    return json.loads(body)


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------


def run_matrix(project: dict, targets: list[str], pythons: list[str], extras: list[str], *,
               legacy: bool = False, workers: int = 3, pip_python: str = sys.executable) -> list[Resolution]:
    jobs = []
    for tname in targets:
        target = TARGETS[tname]
        for python in pythons:
            for extra in extras:
                jobs.append((target, python, extra,
                             requirements_for(project, extra, target.marker_environment(python))))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(resolve, t, py, reqs, extra=ex, legacy=legacy, pip_python=pip_python)
                   for t, py, ex, reqs in jobs]
        results = []
        for f in futures:
            r = f.result()
            print(f"  {r.platform:8} {r.python:5} {r.extra:11} {'ok' if r.ok else 'FAILED'} ({r.seconds} s)",
                  file=sys.stderr, flush=True)
            results.append(r)
    return results


def format_table(results: list[Resolution]) -> str:
    head = f"{'platform':8} {'python':6} {'extra':11} " + " ".join(f"{SHORT[p]:>10}" for p in KEY_PACKAGES)
    lines = [head, "-" * len(head)]
    for r in results:
        row = f"{r.platform:8} {r.python:6} {r.extra:11} "
        if r.ok:
            cells = []
            for p in KEY_PACKAGES:
                v = r.packages.get(p, "-")
                cells.append(f"{v.replace(' (system)', '(deb)'):>10}")
            row += " ".join(cells)
        else:
            row += ("NO (expected: no wheels) " if not r.expected else "FAILED: ") + r.error
        lines.append(row)
    return "\n".join(lines)


def format_availability(avail: dict) -> str:
    lines = []
    for package, per_target in avail.items():
        for tname, per_python in per_target.items():
            cells = []
            for python, info in per_python.items():
                cells.append(f"{python}: " + (f"{info['newest']} ({info['tag']})" if info else "none"))
            lines.append(f"{package:30} {tname:8} " + "; ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    parser.add_argument("--platform", action="append", choices=list(TARGETS), help="default: all")
    parser.add_argument("--python", action="append", choices=list(PYTHONS), help="default: all")
    parser.add_argument("--extra", action="append", help=f"default: {', '.join(DEVICE_EXTRAS)}")
    parser.add_argument("--legacy-tags", action="store_true",
                        help="name only manylinux_2_17/manylinux2014/manylinux_2_28 (what earlier checks did)")
    parser.add_argument("--packages", action="store_true",
                        help="also list the newest wheel of each key package per platform and Python (PyPI JSON)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("FEDPRUNE_BOARDS_CACHE",
                                                                          "/work/boards-cache")) / "pypi-json")
    args = parser.parse_args(argv)

    project = load_project(args.pyproject)
    targets = args.platform or list(TARGETS)
    pythons = args.python or list(PYTHONS)
    extras = args.extra or list(DEVICE_EXTRAS)
    missing = [e for e in extras if canonicalize_name(e) not in
               {canonicalize_name(k) for k in project.get("optional-dependencies", {})}]
    if missing:
        print(f"error: {args.pyproject} has no extra {missing}", file=sys.stderr)
        return 2

    summary: dict = {"source": str(args.pyproject), "legacy_tags": args.legacy_tags,
                     "pip_marker_environment": {k: v for k, v in pip_marker_environment().items()
                                                if k in ("platform_machine", "python_version")}}
    if args.packages:
        avail = wheel_availability(pythons=tuple(pythons), targets=tuple(targets), cache=args.cache)
        print(format_availability(avail))
        print()
        summary["availability"] = avail
    start = time.monotonic()
    results = run_matrix(project, targets, pythons, extras, legacy=args.legacy_tags, workers=args.workers)
    print(format_table(results))
    failed = [r for r in results if r.expected and not r.ok]
    summary.update({"seconds": round(time.monotonic() - start, 1),
                    "failed_expected": [f"{r.platform}/{r.python}/{r.extra}" for r in failed],
                    "results": [r.as_json() for r in results]})
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
