"""The device extras resolve from wheels on every board (scripts/check_device_wheels.py).

The fast tests evaluate the extras' environment markers for each board offline; the slow one asks
PyPI, with pip's ``--platform`` dry run, whether each device extra installs from wheels alone on
Linux x86_64, aarch64 and armv7l with Python 3.10-3.13.
"""

from __future__ import annotations

import platform
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import check_device_wheels as wheels  # noqa: E402  (scripts/)

from packaging.utils import canonicalize_name  # noqa: E402

PYTHONS = wheels.PYTHONS


PROJECT = wheels.load_project()  # pyproject.toml's [project]


def _names(project: dict, extra: str, target: str, python: str) -> dict[str, list[str]]:
    reqs = wheels.requirements_for(project, extra, wheels.TARGETS[target].marker_environment(python))
    out: dict[str, list[str]] = {}
    for r in reqs:
        out.setdefault(canonicalize_name(r.name), []).append(str(r.specifier))
    return out


@pytest.mark.parametrize("python", PYTHONS)
def test_markers_pick_each_boards_runtime(python):
    project = PROJECT
    assert set(wheels.DEVICE_EXTRAS) <= set(project["optional-dependencies"])
    for target in ("x86_64", "aarch64"):
        agent = _names(project, "agent", target, python)
        assert {"tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert"} <= set(agent)
        for extra in ("agent-lite", "inference"):
            lite = _names(project, extra, target, python)
            assert "ai-edge-litert" in lite and "numpy" in lite, (target, extra)
            assert not {"tensorflow", "tf-keras", "tensorflow-model-optimization", "tflite-runtime"} & set(lite)
        assert "zstandard" in agent
    # 32-bit Raspberry Pi OS: no TensorFlow, no LiteRT, no zstandard wheel; tflite-runtime 2.14 with
    # Debian's NumPy 1.24, which every NumPy requirement there must allow.
    for extra in ("agent", "agent-lite", "inference"):
        arm = _names(project, extra, "armv7l", python)
        assert arm.get("tflite-runtime") == ["==2.14.0"], extra
        assert not {"tensorflow", "ai-edge-litert", "zstandard"} & set(arm), extra
        reqs = wheels.requirements_for(project, extra, wheels.TARGETS["armv7l"].marker_environment(python))
        numpy_reqs = [r for r in reqs if canonicalize_name(r.name) == "numpy"]
        assert numpy_reqs and all(r.specifier.contains(wheels.DEBIAN_NUMPY) for r in numpy_reqs)
        assert any(not r.specifier.contains("2.0.0") for r in numpy_reqs)  # tflite-runtime 2.14 breaks on NumPy 2


def test_a_32_bit_userland_on_a_64_bit_kernel_counts_as_armv7l():
    """On a Pi 4/5 a 32-bit Raspberry Pi OS may run a 64-bit kernel; ``linux32 pip ...`` (or
    pip's own armv8l detection) reports armv8l: the markers must treat it as 32-bit ARM."""
    env = {**wheels.TARGETS["armv7l"].marker_environment("3.11"), "platform_machine": "armv8l"}
    names = {canonicalize_name(r.name) for r in wheels.requirements_for(PROJECT, "agent-lite", env)}
    assert "tflite-runtime" in names and "ai-edge-litert" not in names and "zstandard" not in names


def test_board_tags_name_every_manylinux_level_a_bookworm_board_accepts():
    """pip does not widen ``--platform manylinux_2_28_aarch64`` to older levels: LiteRT 2.x and
    TensorFlow 2.21 are tagged manylinux_2_27 only, so every level must be named."""
    tags = wheels.TARGETS["aarch64"].platform_tags("3.11")
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_27_aarch64" in tags
    assert {"manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"} <= set(tags)
    assert "manylinux_2_34_armv7l" in wheels.TARGETS["armv7l"].platform_tags("3.11")  # tflite-runtime 2.14's
    assert wheels.TARGETS["aarch64"].platform_tags("3.13")[0] == "manylinux_2_41_aarch64"  # Trixie
    legacy = wheels.TARGETS["aarch64"].platform_tags("3.11", legacy=True)
    assert "manylinux_2_27_aarch64" not in legacy


def test_pip_evaluates_markers_for_the_host_not_the_target():
    """Why the script evaluates markers itself: pip's report gives the environment it used."""
    env = wheels.pip_marker_environment()
    assert env["platform_machine"] == platform.machine()
    assert env["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_a_requirement_debians_numpy_cannot_meet_is_reported(tmp_path):
    target = wheels.TARGETS["armv7l"]
    with pytest.raises(wheels.ResolutionError, match="Debian numpy 1.24.2"):
        wheels.system_stand_ins(target, [wheels.Requirement("numpy>=2")], tmp_path)
    args = wheels.system_stand_ins(target, [wheels.Requirement("numpy<2")], tmp_path)
    assert "numpy==1.24.2" in args and list(tmp_path.glob("numpy-1.24.2-py3-none-any.whl"))


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_every_device_extra_resolves_from_wheels_on_every_board():
    if not _pypi_reachable():
        pytest.skip("pypi.org is not reachable: the wheel resolution needs PyPI")
    results = wheels.run_matrix(PROJECT, list(wheels.TARGETS), list(PYTHONS), list(wheels.DEVICE_EXTRAS))
    failed = [f"{r.platform}/{r.python}/{r.extra}: {r.error}" for r in results if r.expected and not r.ok]
    assert not failed, "\n".join(failed)
    by_key = {(r.platform, r.python, r.extra): r for r in results}
    bookworm_arm64 = by_key[("aarch64", "3.11", "agent-lite")].packages
    assert "ai-edge-litert" in bookworm_arm64 and "tensorflow" not in bookworm_arm64
    assert "tensorflow" in by_key[("aarch64", "3.13", "agent")].packages  # Trixie
    armhf = by_key[("armv7l", "3.11", "agent-lite")].packages
    assert armhf["tflite-runtime"] == "2.14.0" and armhf["numpy"] == f"{wheels.DEBIAN_NUMPY} (system)"
    # The (board, Python) pairs without any runtime wheel are known, and still fail: if one starts
    # resolving, EXPECTED_UNSUPPORTED is out of date.
    assert all(not r.ok for r in results if not r.expected)
