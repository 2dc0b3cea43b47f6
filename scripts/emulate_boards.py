#!/usr/bin/env python3
"""Emulated Raspberry Pi OS boards: the device extras installed for arm64 and armhf, run under qemu.

For each board (``arm64``: 64-bit Raspberry Pi OS Bookworm; ``armhf``: 32-bit), this script

1. makes sure the host has what it needs (``qemu-user-static``, the board's dpkg architecture,
   ``mosquitto`` for the federation stages), installing it with apt-get when run as root;
2. builds (once; cached) a Debian Bookworm userland from Debian's own packages: ``apt-get
   download`` of Python 3.11 and its libraries for the board's architecture, each unpacked with
   ``dpkg-deb -x`` into ``<cache>/<board>/root`` (armhf adds Debian's python3-numpy 1.24 and
   links its BLAS/LAPACK, which ``dpkg-deb -x`` does not do);
3. installs the extras the stages need from wheels for the board (``pip install --target
   <cache>/<board>/site-<extra> --platform ... --only-binary=:all: --python-version 3.11``, the
   requirements evaluated for the board by ``check_device_wheels``), plus fedprune itself (a
   wheel of this working tree, ``--no-deps``);
4. runs the stages on the board, as ``qemu-<arch>-static -L ROOT -0 BIN/python3 ROOT/usr/bin/
   python3.11 ...``. ``binfmt_misc`` is not mounted on these hosts, so the kernel cannot exec a
   foreign binary: ``BIN/python3`` is a host shell script that calls qemu again, and ``-0`` makes
   the emulated Python's ``sys.executable`` that script, so a child the agent starts with
   ``[sys.executable, "-m", ...]`` goes through qemu too.

Stages (``--stage``, comma-separated; default ``predict,agent-lite``):

- ``predict``: ``fedprune-agent predict`` on a digits CNN (trained and pruned to 80 % on the host)
  exported as sparse float32 and sparse int8 TFLite, on the board; its classes compared with the
  host's (x86_64, the host venv's LiteRT).
- ``agent-lite``: the long-lived agent on the board, with the TensorFlow-free trainer
  (``--trainer litert``), joins a federation whose aggregator runs on the host (Mosquitto on a
  loopback port), completes ``--rounds`` rounds, and installs the final model the aggregator
  exported (the same bytes as the run's ``model-int8.tflite``).
- ``keras``: arm64 only: one round of the Keras trainer (TensorFlow's aarch64 wheel, tf-keras,
  tfmot) in the agent's training child, under emulation; records how long it took.

``--board-pip`` also lets each board's own pip (run under qemu, from pip's wheel) resolve
``fedprune[extra]`` from the fedprune wheel: its own platform tags and markers decide, which a
host-side ``--platform`` dry run cannot show.

Progress goes to stderr; the last line of stdout is one JSON object with the figures (time per
stage, agreement, install size per board and extra). Exit status: 0 all stages ok, 1 a stage
failed, 3 a stage was skipped (what it needs is not in fedprune yet, e.g. ``--trainer``).

    .venv/bin/python scripts/emulate_boards.py                    # both boards, predict + agent-lite (root: apt)
    .venv/bin/python scripts/emulate_boards.py --board arm64 --stage predict,agent-lite,keras
    .venv/bin/python scripts/emulate_boards.py --board-pip --tags --stage predict
    .venv/bin/python scripts/emulate_boards.py --cache /tmp/boards --board armhf --stage predict

Run it with the project's venv (TensorFlow, scikit-learn: the host side exports the models, runs
the aggregator and writes the device's data). Needs root the first time (apt-get, dpkg
--add-architecture), or those done beforehand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_device_wheels as wheels  # noqa: E402  (scripts/)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("FEDPRUNE_BOARDS_CACHE", "/work/boards-cache"))

#: The agent's CLI module: ``fedprune.edge_agent.cli`` once the packages move under ``fedprune``
#: (issue 14), ``edge_agent.cli`` before. The first one present in the installed fedprune wheel runs.
AGENT_MODULES = ("fedprune.edge_agent.cli", "edge_agent.cli")
#: The aggregator's CLI module, likewise (run on the host).
AGGREGATOR_MODULES = ("fedprune.aggregator.cli", "aggregator.cli")

#: Debian Bookworm packages that make a Python 3.11 userland (each for the board's architecture;
#: ``media-types`` is architecture-independent).
BASE_DEBS = (
    "libc6", "python3.11", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "zlib1g",
    "libexpat1", "libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libsqlite3-0", "libncursesw6", "libtinfo6",
    "libreadline8", "libuuid1", "libdb5.3", "libgdbm6", "libcrypt1", "libnsl2", "libtirpc3", "libstdc++6",
    "libgcc-s1",
)
ARCH_ALL_DEBS = ("media-types",)


@dataclass(frozen=True)
class Board:
    name: str
    deb_arch: str
    qemu: str
    triplet: str
    target: str  # check_device_wheels.TARGETS key
    extra_debs: tuple[str, ...] = ()
    system_site: bool = False  # Debian's dist-packages on the path (python3-numpy)
    python: str = "3.11"  # Raspberry Pi OS Bookworm's
    qemu_cpu: str = ""  # qemu's -cpu (default: its "max")
    cpuinfo: str = ""  # one processor's /proc/cpuinfo entry, as the board's kernel writes it

    @property
    def wheel_target(self) -> wheels.Target:
        return wheels.TARGETS[self.target]


#: A Raspberry Pi 4's Cortex-A72 as its 64-bit and its 32-bit kernel list it in /proc/cpuinfo.
PI4_CPUINFO_64 = ("processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                  "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
                  "CPU revision\t: 3\n\n")
PI4_CPUINFO_32 = ("processor\t: {n}\nmodel name\t: ARMv7 Processor rev 3 (v7l)\nBogoMIPS\t: 108.00\n"
                  "Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm "
                  "crc32\nCPU implementer\t: 0x41\nCPU architecture: 7\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
                  "CPU revision\t: 3\n\n")
PI4_CPUINFO_TAIL = "Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n"

BOARDS = {
    "arm64": Board("arm64", "arm64", "qemu-aarch64-static", "aarch64-linux-gnu", "aarch64",
                   qemu_cpu="cortex-a72", cpuinfo=PI4_CPUINFO_64),
    "armhf": Board("armhf", "armhf", "qemu-arm-static", "arm-linux-gnueabihf", "armv7l",
                   # cryptography's armv7l wheel needs cffi's backend, which has no armv7l wheel (docs/edge.md)
                   extra_debs=("python3-numpy", "libblas3", "liblapack3", "libgfortran5", "python3-cffi-backend"),
                   system_site=True,
                   cpuinfo=PI4_CPUINFO_32),
}

#: Which extra each stage installs on the board.
STAGE_EXTRAS = {"predict": "inference", "agent-lite": "agent-lite", "keras": "agent"}
STAGES = tuple(STAGE_EXTRAS)


def log(msg: str) -> None:
    print(f"[emulate_boards {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float | None = None,
        check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, text=True,
                          capture_output=capture, check=False)
    if check and proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-25:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return proc


def du_mb(path: Path) -> float:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return round(total / 1e6, 1)


# --------------------------------------------------------------------------------------------
# Host tools
# --------------------------------------------------------------------------------------------


def ensure_host_tools(boards: list[Board], need_broker: bool) -> dict:
    """qemu-user-static, the boards' dpkg architectures (for ``apt-get download``) and, for the
    federation stages, mosquitto; installed with apt-get when missing and running as root."""
    packages = []
    if any(shutil.which(b.qemu) is None for b in boards):
        packages.append("qemu-user-static")
    if need_broker and not _mosquitto():
        packages.append("mosquitto")
    foreign = set(run(["dpkg", "--print-foreign-architectures"]).stdout.split())
    arches = [b.deb_arch for b in boards if b.deb_arch not in foreign]
    lists_missing = [b.deb_arch for b in boards if not _apt_has_lists(b.deb_arch)]
    done = {"apt_installed": packages, "dpkg_architectures_added": arches}
    if not (packages or arches or lists_missing):
        return done
    if os.geteuid() != 0:
        what = []
        if arches:
            what.append(" && ".join(f"sudo dpkg --add-architecture {a}" for a in arches))
        what.append("sudo apt-get update")
        if packages:
            what.append(f"sudo apt-get install -y {' '.join(packages)}")
        raise SystemExit("error: this host lacks what the emulated boards need; run as root, or first: "
                         + " && ".join(what))
    for arch in arches:
        log(f"dpkg --add-architecture {arch}")
        run(["dpkg", "--add-architecture", arch])
    log("apt-get update")
    run(["apt-get", "update", "-qq"], timeout=900)
    if packages:
        log(f"apt-get install {' '.join(packages)}")
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=900)
    return done


def _mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def _apt_has_lists(arch: str) -> bool:
    lists = Path("/var/lib/apt/lists")
    return any(lists.glob(f"*binary-{arch}_Packages*"))


# --------------------------------------------------------------------------------------------
# The userland
# --------------------------------------------------------------------------------------------


def write_cpuinfo(board: Board, root: Path) -> None:
    """``ROOT/proc/cpuinfo``: an ARM board's, one entry per host CPU.

    qemu-user (7.2, Debian Bookworm's) passes the host's x86 /proc/cpuinfo through to the guest,
    and the cpuinfo library inside LiteRT 2.2 and later then dereferences a null pointer while it
    initialises (SIGSEGV in ``Interpreter()``, with or without default delegates; LiteRT 1.4.0 and
    2.1.0 survive it). qemu's ``-L`` serves a file that exists under ROOT in place of the absolute
    path, so the guest reads this one, as it would on a Pi.
    """
    if not board.cpuinfo:
        return
    (root / "proc").mkdir(exist_ok=True)
    n = os.cpu_count() or 1
    (root / "proc" / "cpuinfo").write_text("".join(board.cpuinfo.format(n=i) for i in range(n)) + PI4_CPUINFO_TAIL)


def build_root(board: Board, cache: Path) -> Path:
    """``<cache>/<board>/root``: Debian's packages for the board, unpacked with ``dpkg-deb -x``."""
    root = cache / board.name / "root"
    wanted = sorted(BASE_DEBS + board.extra_debs) + sorted(ARCH_ALL_DEBS)
    stamp = root / ".fedprune-root.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("packages") == wanted:
        write_cpuinfo(board, root)
        return root
    debs = cache / board.name / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    log(f"{board.name}: apt-get download {len(wanted)} packages")
    names = [f"{p}:{board.deb_arch}" for p in BASE_DEBS + board.extra_debs] + list(ARCH_ALL_DEBS)
    run(["apt-get", "download", "-q", *names], cwd=debs, timeout=900)
    tmp = root.with_name("root.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for deb in sorted(debs.glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(tmp)])
    if board.system_site:  # no alternatives from dpkg-deb -x: point the generic names at the reference BLAS
        lib = tmp / "usr/lib" / board.triplet
        for name, sub in (("libblas.so.3", "blas"), ("liblapack.so.3", "lapack")):
            link = lib / name
            if not link.exists() and (lib / sub / name).exists():
                link.symlink_to(f"{sub}/{name}")
    versions = {d.name.split("_")[0]: d.name.split("_")[1] for d in debs.glob("*.deb")}
    (tmp / ".fedprune-root.json").write_text(json.dumps({"packages": wanted, "versions": versions}))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    write_cpuinfo(board, root)
    return root


@dataclass
class BoardRunner:
    """Runs the board's Python under qemu, with ``sites`` (and Debian's dist-packages) on its path."""

    board: Board
    root: Path
    bin_dir: Path
    sites: list[Path] = field(default_factory=list)

    @property
    def python(self) -> Path:
        """The wrapper: a host shell script, so the kernel (and any child's exec) can run it."""
        return self.bin_dir / "python3"

    def write_wrapper(self) -> None:
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        qemu = shutil.which(self.board.qemu) or self.board.qemu
        cpu = f"-cpu {self.board.qemu_cpu} " if self.board.qemu_cpu else ""
        python = f"{self.root}/usr/bin/python{self.board.python}"
        body = textwrap.dedent(f"""\
            #!/bin/sh
            # The {self.board.name} board's Python 3.11 under qemu (written by scripts/emulate_boards.py).
            # -0 "$0": the emulated Python sees this script as argv[0], so sys.executable is this
            # script and the children it starts come back here.
            exec {qemu} {cpu}-L {self.root} -0 "$0" {python} "$@"
            """)
        for name in ("python3", f"python{self.board.python}", "python"):
            path = self.bin_dir / name
            path.write_text(body)
            path.chmod(0o755)

    def env(self, extra: dict | None = None) -> dict:
        paths = [str(s) for s in self.sites]
        if self.board.system_site:
            paths.append(str(self.root / "usr/lib/python3/dist-packages"))
        keep = {k: v for k, v in os.environ.items()
                if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QEMU_", "TF_", "PIP_"))}
        env = {**keep, "PYTHONPATH": os.pathsep.join(paths), "PYTHONNOUSERSITE": "1",
               "PYTHONUNBUFFERED": "1", "PATH": f"{self.bin_dir}{os.pathsep}{keep.get('PATH', '/usr/bin:/bin')}",
               # The stdlib by its real path under ROOT, not through qemu's -L remapping of /usr:
               # qemu-arm 7.2 does not remap statx(), which 32-bit glibc 2.36 uses for stat(), so on
               # armhf lib-dynload's extensions (_contextvars, ...) are listed but "not found".
               # Debian's site.py then adds ROOT/usr/lib/python3/dist-packages (python3-numpy on
               # armhf), as in a venv made with --system-site-packages.
               "PYTHONHOME": str(self.root / "usr")}
        env.update(extra or {})
        return env

    def cmd(self, *args: str) -> list[str]:
        return [str(self.python), *args]

    def direct_cmd(self, *args: str) -> list[str]:
        """qemu without the wrapper: ``sys.executable`` is then the board's ELF python3.11, which
        pip reads to decide armhf's hard-float ABI (with the wrapper script as sys.executable,
        pip on armhf accepts no manylinux tag, only linux_armv7l). Children cannot be started."""
        qemu = shutil.which(self.board.qemu) or self.board.qemu
        cpu = ["-cpu", self.board.qemu_cpu] if self.board.qemu_cpu else []
        return [qemu, *cpu, "-L", str(self.root), str(self.root / f"usr/bin/python{self.board.python}"), *args]

    @property
    def cwd(self) -> Path:
        """Where board commands run: not the repository, whose folders would shadow the installed
        packages (``python -m`` puts the working directory first on sys.path)."""
        return self.bin_dir.parent

    def run(self, *args: str, timeout: float = 600, check: bool = True, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return run(self.cmd(*args), env=self.env(env), timeout=timeout, check=check, cwd=cwd or self.cwd)


# --------------------------------------------------------------------------------------------
# Wheels for the board
# --------------------------------------------------------------------------------------------


def fedprune_wheel(cache: Path, host_python: str, source: str = "worktree") -> Path:
    """A wheel of this working tree (tracked and untracked, not ignored, files), or of commit
    ``source`` (``git archive``), built in a copy so the tree gets no build/ or egg-info from it."""
    out = cache / "fedprune-wheel"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="fedprune-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        if source == "worktree":
            files = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO).stdout.split("\0")
            for rel in filter(None, files):
                p = REPO / rel
                if p.is_file():
                    dst = src / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, dst)
        else:
            archive = Path(tmp) / "src.tar"
            run(["git", "archive", "--format=tar", "-o", str(archive), source], cwd=REPO)
            run(["tar", "-xf", str(archive), "-C", str(src)])
        run([host_python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)], timeout=600)
    (wheel,) = out.glob("fedprune-*.whl")
    return wheel


def install_site(board: Board, extra: str, cache: Path, project: dict, wheel: Path,
                 host_python: str, pins: list[str] | None = None) -> tuple[Path, dict]:
    """``<cache>/<board>/site-<extra>``: the extra's requirements for the board from wheels, and
    fedprune (``--no-deps``). Reused while the requirement list is unchanged; fedprune is
    reinstalled each time (the working tree changes)."""
    target = board.wheel_target
    reqs = wheels.requirements_for(project, extra, target.marker_environment(board.python))
    reqs += [wheels.Requirement(p) for p in pins or []]
    site = cache / board.name / (f"site-{extra}" + ("-" + hashlib.sha256(" ".join(pins).encode()).hexdigest()[:8]
                                                    if pins else ""))
    stamp = site / ".fedprune-site.json"
    key = sorted(str(r) for r in reqs)
    info: dict = {}
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("requirements") == key):
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        log(f"{board.name}: pip install --target {site} for [{extra}]: {', '.join(key)}")
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="fedprune-stubs-") as tmp:
            system = wheels.system_stand_ins(target, reqs, Path(tmp))
            names = set(target.system_packages)
            to_pip = [str(r) for r in reqs if wheels.canonicalize_name(r.name) not in names]
            run([host_python, "-m", "pip", *wheels.pip_base_args(), "install", "--index-url", wheels.INDEX_URL,
                 "--target", str(site), *wheels.pip_platform_args(target, board.python), "-q",
                 *system, *to_pip], timeout=1800)
        for name in target.system_packages:  # stand-ins only: the board's own (Debian's) one is imported
            for d in site.glob(f"{name}-*.dist-info"):
                shutil.rmtree(d)
        info["pip_s"] = round(time.monotonic() - start, 1)
        installed = sorted(d.name[: -len(".dist-info")] for d in site.glob("*.dist-info"))
        stamp.write_text(json.dumps({"requirements": key, "installed": installed}))
    run([host_python, "-m", "pip", *wheels.pip_base_args(), "install", "--no-index", "--no-deps", "--upgrade",
         "--target", str(site), "-q", *wheels.pip_platform_args(target, board.python), str(wheel)], timeout=300)
    info["installed"] = json.loads(stamp.read_text())["installed"]
    info["size_mb"] = du_mb(site)
    return site, info


@dataclass
class Host:
    """The host side: the host venv's Python (TensorFlow, LiteRT) with the same fedprune wheel as
    the boards first on its path, run outside the repository."""

    python: str
    site: Path

    def env(self, extra: dict | None = None) -> dict:
        keep = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONPATH")}
        return {**keep, "PYTHONPATH": str(self.site), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
                **(extra or {})}

    @property
    def cwd(self) -> Path:
        return self.site.parent


def host_site(cache: Path, wheel: Path, host_python: str) -> Host:
    site = cache / "host" / "site-fedprune"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    run([host_python, "-m", "pip", *wheels.pip_base_args(), "install", "--no-index", "--no-deps", "--target",
         str(site), "-q", str(wheel)], timeout=300)
    return Host(host_python, site)


def agent_module(site: Path, modules: tuple[str, ...] = AGENT_MODULES) -> str:
    for module in modules:
        if (site / (module.replace(".", "/") + ".py")).is_file():
            return module
    raise RuntimeError(f"none of {modules} in {site}")


# --------------------------------------------------------------------------------------------
# Stage (a): predict
# --------------------------------------------------------------------------------------------

EXPORT_SCRIPT = r'''
import json, sys
from pathlib import Path
import numpy as np
from fedprune.data import load_dataset
from fedprune.keras_setup import keras
from fedprune.models import build_model
try:
    from fedprune.converters.tflite_export import export_sparse_tflite
except ImportError:  # before issue 14's rename
    from converters.tflite_export import export_sparse_tflite

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
keras.utils.set_random_seed(0)
data = load_dataset("digits", test_fraction=0.2, seed=0)
model = build_model("fedprune.models:digits_cnn", data.input_shape, data.num_classes)
model.compile(optimizer=keras.optimizers.Adam(0.003), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"])
model.fit(data.x_train, data.y_train, epochs=8, batch_size=32, verbose=0)
# Magnitude pruning to 80 % per kernel, then one epoch with the mask held.
masks = []
for layer in model.layers:
    ws = layer.get_weights()
    if ws and ws[0].ndim >= 2:
        k = ws[0]; m = np.abs(k) > np.quantile(np.abs(k), 0.8)
        layer.set_weights([k * m, *ws[1:]]); masks.append((layer, m))
class Hold(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        for layer, m in masks:
            ws = layer.get_weights(); layer.set_weights([ws[0] * m, *ws[1:]])
model.fit(data.x_train, data.y_train, epochs=1, batch_size=32, verbose=0, callbacks=[Hold()])
x = data.x_test.astype(np.float32)
np.save(out / "x_test.npy", x)
np.save(out / "y_test.npy", data.y_test)
result = {"keras_accuracy": float(np.mean(model.predict(x, verbose=0).argmax(-1) == data.y_test))}
for precision in ("float32", "int8"):
    e = export_sparse_tflite(model, out / f"digits-{precision}.tflite", precision, representative_x=data.x_train,
                             eval_x=x, eval_y=data.y_test)
    result[precision] = {"size_bytes": e.size_bytes, "runtime": e.runtime, "accuracy": e.accuracy}
print(json.dumps(result))
'''


def export_models(folder: Path, host: Host) -> dict:
    """The digits CNN, trained and pruned on the host, exported as sparse float32 and int8."""
    stamp = folder / "export.json"
    # The files are exported again whenever the exporter changed: the boards must run what it writes now.
    exporter = hashlib.sha256(b"".join((REPO / "converters" / name).read_bytes()
                                       for name in ("tflite_export.py", "tflite_size.py"))).hexdigest()
    if (stamp.is_file() and json.loads(stamp.read_text()).get("exporter") == exporter
            and all((folder / f"digits-{p}.tflite").is_file() for p in ("float32", "int8"))):
        return json.loads(stamp.read_text())
    log("host: training the digits CNN and exporting sparse float32/int8 TFLite")
    proc = run([host.python, "-c", EXPORT_SCRIPT, str(folder)], env=host.env(), timeout=900, cwd=host.cwd)
    info = json.loads(proc.stdout.strip().splitlines()[-1]) | {"exporter": exporter}
    stamp.write_text(json.dumps(info))
    return info


def predict_json(cmd: list[str], env: dict, cwd: Path, timeout: float = 600) -> tuple[dict, float]:
    """``predict``'s summary (``--json``) with each sample's class from its ``--output`` file."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cwd) as tmp:
        results = Path(tmp) / "results.jsonl"
        proc = run([*cmd, "--json", "--output", str(results)], env=env, timeout=timeout, cwd=cwd)
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        summary["classes"] = [json.loads(line)["class"] for line in results.read_text().splitlines()]
    return summary, round(time.monotonic() - start, 1)


def stage_predict(runner: BoardRunner, site: Path, models: Path, host: Host) -> dict:
    module = agent_module(site)
    host_module = agent_module(host.site)
    out: dict = {}
    y = None
    for precision in ("float32", "int8"):
        model = models / f"digits-{precision}.tflite"
        args = ["predict", "--model", str(model), "--input", str(models / "x_test.npy")]
        host_out, host_s = predict_json([host.python, "-m", host_module, *args], host.env(), cwd=host.cwd)
        board, board_s = predict_json(runner.cmd("-m", module, *args), runner.env(), cwd=runner.cwd)
        hc, bc = host_out["classes"], board["classes"]
        if y is None:
            import numpy as np

            y = np.load(models / "y_test.npy").tolist()
        agree = sum(a == b for a, b in zip(hc, bc)) / len(hc)
        out[precision] = {
            "samples": len(bc), "agreement": round(agree, 4),
            "board_accuracy": round(sum(a == b for a, b in zip(bc, y)) / len(y), 4),
            "host_accuracy": round(sum(a == b for a, b in zip(hc, y)) / len(y), 4),
            "board_runtime": f"{board['runtime']} ({board['delegates']})",
            "host_runtime": f"{host_out['runtime']} ({host_out['delegates']})",
            "board_s": board_s, "host_s": host_s,
        }
        log(f"{runner.board.name}: predict {precision}: agreement {agree:.4f}, board {board['runtime']} "
            f"({board['delegates']}) in {board_s} s")
    return out


# --------------------------------------------------------------------------------------------
# Stages (b) and (c): a federation on the host, the agent on the board
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A private Mosquitto on a free loopback port, sized for a federation's bursts."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 10000\nmessage_size_limit 0\n")
        self.log = open(folder / "mosquitto.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([_mosquitto() or "mosquitto", "-c", str(conf)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"mosquitto did not listen on {self.port}: {folder / 'mosquitto.log'}")
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> int | None:
    """SIGTERM, then SIGKILL of its process group (it was started in its own session)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        return proc.wait(10)


TASK_TOML = """\
# Written by scripts/emulate_boards.py: a short digits federation for {devices} emulated device(s).
seed = 0

[model]
factory = "fedprune.models:digits_cnn"

[data]
dataset = "digits"
test_fraction = 0.2
partition = "iid"

[federation]
id = "{federation}"
rounds = {rounds}
devices_per_round = {devices}
min_devices = {devices}
round_timeout_s = {round_timeout_s}
max_round_retries = 0
wait_for_devices_s = {wait_s}

[training]
local_epochs = 1
batch_size = 16
optimizer = "adam"
learning_rate = 0.003

[pruning]
initial_sparsity = 0.5
final_sparsity = 0.8
begin_round = 0
end_round = {rounds}
frequency = 1
leave_dense = ["logits"]

[transport]
uplink_precision = "int8"
downlink_precision = "float32"
"""


def device_data(path: Path, n: int = 300, seed: int = 1) -> Path:
    """The device's own .npz: ``n`` digits (scikit-learn's), as the test helpers write them."""
    from sklearn.datasets import load_digits

    import numpy as np

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    order = np.random.default_rng(seed).permutation(len(x))[:n]
    np.savez(path, x_train=x[order], y_train=d.target[order].astype(np.int64))
    return path


def agent_options(runner: BoardRunner, site: Path) -> str:
    module = agent_module(site)
    return runner.run("-m", module, "run", "--help", timeout=300).stdout


def stage_federation(runner: BoardRunner, site: Path, work: Path, host: Host, *, trainer: str | None,
                     rounds: int, round_timeout_s: float, federation: str) -> dict:
    """The agent on the board joins a federation whose aggregator (and Mosquitto) run on the
    host, for ``rounds`` rounds; returns times, per-round lines and the agent's model."""
    module = agent_module(site)
    if trainer is not None:
        help_text = agent_options(runner, site)
        if "--trainer" not in help_text:
            return {"ok": False, "skipped": f"the agent has no --trainer option yet ({module} run --help); "
                                            f"stage needs the TensorFlow-free trainer (issue 15)"}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    task = work / "task.toml"
    task.write_text(TASK_TOML.format(devices=1, federation=federation, rounds=rounds,
                                     round_timeout_s=int(round_timeout_s), wait_s=int(round_timeout_s)))
    data = device_data(work / "local.npz")
    broker = Mosquitto(work / "broker")
    agg_module = agent_module(host.site, AGGREGATOR_MODULES)
    agg_log = open(work / "aggregator.log", "wb")  # noqa: SIM115
    agent_log = open(work / "agent.log", "wb")  # noqa: SIM115
    start = time.monotonic()
    from fedprune.aggregator_key import public_key_file, write_key_pair

    write_key_pair(work / "aggregator.key")  # the agent trusts it from the start (protocol version 2)
    aggregator = subprocess.Popen([host.python, "-m", agg_module, "--task", str(task), "--broker", broker.url,
                                   "--run-dir", str(work / "run"), "--signing-key", str(work / "aggregator.key")],
                                  cwd=work, env=host.env(), stdout=agg_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    agent_args = ["-m", module, "run", "--broker", broker.url, "--device-id", f"{runner.board.name}-01",
                  "--data", str(data), "--state-dir", str(work / "state"), "--federation", federation,
                  "--log-level", "INFO", "--aggregator-key", str(public_key_file(work / "aggregator.key"))]
    if trainer is not None:
        agent_args += ["--trainer", trainer]
    agent = subprocess.Popen(runner.cmd(*agent_args), env=runner.env({"TF_CPP_MIN_LOG_LEVEL": "2"}), cwd=work,
                             stdout=agent_log, stderr=subprocess.STDOUT, start_new_session=True)
    result: dict = {"ok": False, "trainer": trainer or "keras (child process)", "rounds_wanted": rounds}
    try:
        deadline = start + rounds * round_timeout_s + 600
        while time.monotonic() < deadline:
            if aggregator.poll() is not None or agent.poll() is not None:
                break
            time.sleep(2)
        result["aggregator_exit"] = aggregator.poll()
        result["wall_s"] = round(time.monotonic() - start, 1)
        # The agent installs the final model the aggregator published after the last round (a
        # Keras agent first the last round's own export): give it the time (it is what `predict`
        # on the device runs next).
        manifest = work / "state" / "model" / "manifest.json"
        wait_until = time.monotonic() + min(round_timeout_s, 900)
        while agent.poll() is None and time.monotonic() < wait_until:
            current = _current_model(manifest)
            if current and current.get("final") and current.get("round", 0) >= rounds:
                break
            time.sleep(2)
        result["agent_exit_before_stop"] = agent.poll()
        result["model_wait_s"] = round(time.monotonic() - start - result["wall_s"], 1)
    finally:
        stop_process(aggregator)
        agent_exit = stop_process(agent, timeout=60)
        broker.stop()
        agg_log.close()
        agent_log.close()
    result["agent_exit"] = agent_exit
    metrics = work / "run" / "metrics.jsonl"
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.is_file() else []
    result["rounds"] = [_round_summary(m) for m in lines]
    completed = [r for r in result["rounds"] if r.get("reported", 0) >= 1]
    result["rounds_completed"] = len(completed)
    result["agent_model"] = _current_model(work / "state" / "model" / "manifest.json")
    exported = work / "run" / "model-int8.tflite"  # the device's model.export: int8 (the default)
    result["final_model_installed"] = bool(
        exported.is_file() and result["agent_model"] and result["agent_model"].get("final")
        and result["agent_model"].get("sha256") == hashlib.sha256(exported.read_bytes()).hexdigest())
    result["device_rounds"] = _agent_rounds(work / "agent.log")
    result["ok"] = len(completed) >= rounds and result["aggregator_exit"] == 0 and result["final_model_installed"]
    result["logs"] = {"agent": str(work / "agent.log"), "aggregator": str(work / "aggregator.log")}
    if not result["ok"]:
        result["agent_log_tail"] = (work / "agent.log").read_text(errors="replace").splitlines()[-15:]
        result["aggregator_log_tail"] = (work / "aggregator.log").read_text(errors="replace").splitlines()[-15:]
    return result


def _current_model(manifest: Path) -> dict | None:
    try:
        return json.loads(manifest.read_text()).get("current")
    except (OSError, ValueError):
        return None


def _agent_rounds(agent_log: Path) -> list[dict]:
    """Per round, from the agent's log: seconds from the training child's start to the update
    sent, and how the child ended (its wall time and peak RSS as the agent measured them)."""
    import re
    from datetime import datetime

    def stamp(line: str) -> float | None:
        try:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            return None

    rounds: dict[int, dict] = {}
    current = None
    for line in agent_log.read_text(errors="replace").splitlines():
        if m := re.search(r"round (\d+): training in child pid", line):
            current = int(m.group(1))
            rounds.setdefault(current, {"round": current})["_start"] = stamp(line)
        elif (m := re.search(r"\bround (\d+)\b", line)) and int(m.group(1)) not in rounds and stamp(line):
            # A trainer without a child process: the round's first line starts its clock.
            current = int(m.group(1))
            rounds[current] = {"round": current, "_start": stamp(line)}
            if n := re.search(r"sent update for round (\d+) \((\d+) bytes\)", line):
                rounds[current]["update_bytes"] = int(n.group(2))
        elif m := re.search(r"sent update for round (\d+) \((\d+) bytes\)", line):
            r = rounds.setdefault(int(m.group(1)), {"round": int(m.group(1))})
            r["update_bytes"] = int(m.group(2))
            t = stamp(line)
            if t and r.get("_start"):
                r["start_to_update_s"] = round(t - r["_start"], 1)
        elif (m := re.search(r"training child exited \(code (-?\d+)\) after ([\d.]+) s, peak RSS ([\d.]+) MB",
                               line)) and current is not None:
            rounds[current].update({"child_exit": int(m.group(1)), "child_s": float(m.group(2)),
                                    "child_peak_rss_mb": float(m.group(3))})
        elif "round" in line and ("failed" in line.lower() or "error" in line.lower()) and current is not None:
            rounds[current].setdefault("errors", []).append(line[24:240])
    return [{k: v for k, v in r.items() if not k.startswith("_")} for _, r in sorted(rounds.items())]


def _round_summary(m: dict) -> dict:
    keys = ("round", "selected", "reported", "rejected", "lost", "offline", "accuracy", "sparsity", "wall_s",
            "train_s", "transfer_s", "bytes_down", "bytes_up", "rejections")
    return {k: m[k] for k in keys if k in m}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _board_pip_env(runner: BoardRunner, cache: Path, host_python: str) -> dict:
    """The board's environment with only pip (run from its wheel) on PYTHONPATH."""
    pip_dir = cache / "pip-wheel"
    if not any(pip_dir.glob("pip-*.whl")):
        pip_dir.mkdir(parents=True, exist_ok=True)
        run([host_python, "-m", "pip", *wheels.pip_base_args(), "download", "--index-url", wheels.INDEX_URL,
             "--no-deps", "--only-binary=:all:", "-q", "-d", str(pip_dir), "pip"], timeout=300)
    (pip_wheel,) = sorted(pip_dir.glob("pip-*.whl"))[-1:]
    env = runner.env()
    env["PYTHONPATH"] = str(pip_wheel)
    return env


def board_pip_check(runner: BoardRunner, cache: Path, host_python: str, wheel: Path, extra: str) -> dict:
    """``pip install --dry-run --only-binary=:all: "fedprune[extra] @ wheel"`` run by the board's
    own Python: its own platform tags and environment markers, and (armhf) Debian's NumPy already
    installed, as in a venv made with --system-site-packages. The wheel's metadata decides."""
    env = _board_pip_env(runner, cache, host_python)
    start = time.monotonic()
    proc = run(runner.direct_cmd("-m", "pip", *wheels.pip_base_args(), "install", "--index-url", wheels.INDEX_URL,
                                 "--dry-run", "--only-binary=:all:", "--report", "-", "-q",
                                 f"fedprune[{extra}] @ {wheel.as_uri()}"),
               env=env, timeout=1800, cwd=runner.cwd, check=False)
    out: dict = {"s": round(time.monotonic() - start, 1), "ok": proc.returncode == 0}
    if proc.returncode == 0:
        report = json.loads(proc.stdout)
        out["packages"] = {i["metadata"]["name"]: i["metadata"]["version"] for i in report["install"]}
        out["marker_environment"] = {k: report["environment"][k] for k in ("platform_machine", "python_version")}
    else:
        out["error"] = wheels._pip_error(proc.stderr)
    return out


def board_tags(runner: BoardRunner, cache: Path, host_python: str) -> list[str]:
    """The platform tags the board's own pip accepts (``pip debug --verbose`` run on the board),
    with pip from a wheel on its path."""
    env = _board_pip_env(runner, cache, host_python)
    out = run(runner.direct_cmd("-m", "pip", "debug", "--verbose"), env=env, timeout=600, cwd=runner.cwd).stdout
    tags = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith(f"cp{runner.board.python.replace('.', '')}-cp"):
            platform = line.split("-")[-1]
            if platform not in tags:
                tags.append(platform)
    return tags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--board", action="append", choices=list(BOARDS), help="default: both")
    parser.add_argument("--stage", default="predict,agent-lite",
                        help=f"comma-separated, of {', '.join(STAGES)} (default predict,agent-lite)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"userlands, wheels and work folders (default {DEFAULT_CACHE})")
    parser.add_argument("--host-python", default=str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists()
                        else sys.executable, help="the host's Python with TensorFlow (exports, aggregator)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the agent-lite stage (default 2)")
    parser.add_argument("--round-timeout-s", type=float, default=900,
                        help="the federation's round deadline (emulated training is slow)")
    parser.add_argument("--keras-pin", action="append", default=None,
                        help="extra pins for the keras stage's install, e.g. tensorflow==2.20.0")
    parser.add_argument("--source", default="worktree",
                        help="what fedprune wheel to test: 'worktree' (default) or a git revision, e.g. HEAD")
    parser.add_argument("--tags", action="store_true", help="also list the platform tags the board's own pip accepts")
    parser.add_argument("--board-pip", action="store_true",
                        help="also let the board's own pip resolve each stage's extra from the fedprune wheel "
                             "(slow under emulation)")
    args = parser.parse_args(argv)

    stages = [s.strip() for s in args.stage.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    boards = [BOARDS[b] for b in (args.board or list(BOARDS))]
    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEDPRUNE_PIP_CACHE", str(cache / "pip-cache"))
    figures: dict = {"stages": stages, "boards": {}}
    t0 = time.monotonic()
    figures["host"] = ensure_host_tools(boards, need_broker=any(s != "predict" for s in stages))

    project = wheels.load_project()
    extras_here = {wheels.canonicalize_name(k) for k in project.get("optional-dependencies", {})}
    needed = {STAGE_EXTRAS[s] for s in stages}
    if not needed <= extras_here:
        parser.error(f"pyproject.toml has no extra {sorted(needed - extras_here)} for the stages {stages}")

    t = time.monotonic()
    wheel = fedprune_wheel(cache, args.host_python, args.source)
    figures["fedprune_wheel"] = {"file": wheel.name, "source": args.source, "build_s": round(time.monotonic() - t, 1)}
    models = cache / "models"
    host = host_site(cache, wheel, args.host_python)
    if "predict" in stages:
        t = time.monotonic()
        figures["export"] = {**export_models(models, host), "s": round(time.monotonic() - t, 1)}

    failed = False
    skipped: list[str] = []
    for board in boards:
        fig: dict = figures["boards"].setdefault(board.name, {"sites": {}})
        try:
            t = time.monotonic()
            root = build_root(board, cache)
            fig["root"] = {"path": str(root), "size_mb": du_mb(root), "build_s": round(time.monotonic() - t, 1),
                           "python": json.loads((root / ".fedprune-root.json").read_text())["versions"].get(
                               f"python{board.python}")}
            runner = BoardRunner(board, root, cache / board.name / "bin")
            runner.write_wrapper()
            t = time.monotonic()
            probe = runner.run("-c", "import sys, platform; print(sys.executable); print(platform.machine()); "
                                     "print(sys.version.split()[0])", timeout=120).stdout.split()
            fig["python"] = {"sys_executable": probe[0], "machine": probe[1], "version": probe[2],
                             "start_s": round(time.monotonic() - t, 1)}
            log(f"{board.name}: Python {probe[2]} on {probe[1]}, sys.executable {probe[0]}, "
                f"{fig['python']['start_s']} s to start")
            if args.tags:
                fig["pip_tags"] = board_tags(runner, cache, args.host_python)
            if args.board_pip:
                fig["board_pip"] = {}
                for extra in sorted({STAGE_EXTRAS[s] for s in stages}):
                    fig["board_pip"][extra] = board_pip_check(runner, cache, args.host_python, wheel, extra)
                    r = fig["board_pip"][extra]
                    log(f"{board.name}: the board's pip resolves fedprune[{extra}]: " + (
                        ", ".join(f"{k} {v}" for k, v in sorted(r["packages"].items())
                                  if k in wheels.KEY_PACKAGES or k.replace("_", "-") in wheels.KEY_PACKAGES)
                        if r["ok"] else f"NO: {r['error']}") + f" ({r['s']} s)")
            for stage in stages:
                if stage == "keras" and board.name != "arm64":
                    fig[stage] = {"ok": None, "not_applicable": "no TensorFlow wheels for 32-bit ARM"}
                    continue
                extra = STAGE_EXTRAS[stage]
                pins = args.keras_pin if stage == "keras" else None
                t = time.monotonic()
                site, info = install_site(board, extra, cache, project, wheel, args.host_python, pins)
                fig["sites"][site.name] = {**info, "install_s": round(time.monotonic() - t, 1)}
                runner.sites = [site]
                t = time.monotonic()
                log(f"{board.name}: stage {stage} (site {site.name}, {info['size_mb']} MB)")
                if stage == "predict":
                    fig[stage] = stage_predict(runner, site, models, host)
                    fig[stage]["ok"] = all(v["agreement"] >= 0.99 for v in fig[stage].values())
                else:
                    fig[stage] = stage_federation(
                        runner, site, cache / board.name / f"work-{stage}", host,
                        trainer="litert" if stage == "agent-lite" else "keras" if _has_trainer_flag(runner, site)
                        else None, rounds=args.rounds if stage == "agent-lite" else 1,
                        round_timeout_s=args.round_timeout_s, federation=f"emu-{board.name}-{stage}")
                fig[stage]["stage_s"] = round(time.monotonic() - t, 1)
                verdict = "SKIPPED" if "skipped" in fig[stage] else "ok" if fig[stage].get("ok") else "FAILED"
                log(f"{board.name}: stage {stage}: {verdict} in {fig[stage]['stage_s']} s"
                    + (f" ({fig[stage]['skipped']})" if "skipped" in fig[stage] else ""))
                if "skipped" in fig[stage]:
                    skipped.append(f"{board.name}/{stage}")
                failed |= not fig[stage].get("ok") and "skipped" not in fig[stage]
        except Exception as e:  # noqa: BLE001 - report it in the figures, go on with the next board
            log(f"{board.name}: FAILED: {e}")
            fig["error"] = str(e)[-2000:]
            failed = True
    figures["total_s"] = round(time.monotonic() - t0, 1)
    figures["skipped"] = skipped
    figures["ok"] = not failed and not skipped
    print(json.dumps(figures))
    return 1 if failed else 3 if skipped else 0


def _has_trainer_flag(runner: BoardRunner, site: Path) -> bool:
    try:
        return "--trainer" in agent_options(runner, site)
    except RuntimeError:
        return False


if __name__ == "__main__":
    sys.exit(main())
