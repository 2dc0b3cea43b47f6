"""The layers hold and the distribution claims one import name (scripts/check_architecture.py).

The checks read the source (``ast``), so they are fast and need no import of the code itself;
the wheel is built once, for the installed-names check.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_architecture", ROOT / "scripts" / "check_architecture.py")
arch = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = arch  # its dataclasses look their module up there
_spec.loader.exec_module(arch)


def test_no_import_runs_the_wrong_way_between_layers():
    assert [str(a) for a in arch.wrong_arrows()] == []


def test_the_checker_sees_a_wrong_arrow(tmp_path):
    # A copy of the layout with converters importing the base must be caught, or the test above
    # could pass on a checker that sees nothing.
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for folder in ("fedprune", *arch.FOLDER_NAMES):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "converters" / "codec.py").write_text("def f():\n    from fedprune.task import Task\n")
    (tmp_path / "fedprune" / "task.py").write_text("from fedprune.edge_agent import device\n")
    (tmp_path / "fedprune" / "data.py").write_text("from fedprune import aggregator\n")
    found = sorted((a.source, a.target) for a in arch.wrong_arrows(tmp_path))
    assert found == [("fedprune.converters.codec", "fedprune.task"), ("fedprune.data", "fedprune.aggregator"),
                     ("fedprune.task", "fedprune.edge_agent")]


def test_code_uses_the_installed_names_not_the_folders():
    assert arch.bare_imports() == []


def test_every_package_folder_is_declared_in_pyproject():
    found = {".".join([package, *init.parent.relative_to(folder).parts])
             for package, folder in arch.package_folders().items() for init in folder.rglob("__init__.py")}
    assert sorted(found) == sorted(arch.declared_packages())


@pytest.mark.skipif(not (ROOT / "aggregator" / "server.py").exists(), reason="no aggregator in this checkout")
def test_the_wheel_installs_only_the_fedprune_import_name_and_every_module():
    contents = arch.wheel_contents()
    assert contents["top_level"] == ["fedprune"] and contents["missing_modules"] == []
    # The licence as an SPDX expression with its file (a TOML table made setuptools warn), and
    # no other deprecation in the build.
    assert contents["license"] == ["License-Expression: Apache-2.0", "License-File: LICENSE"]
    assert contents["build_warnings"] == []
    # The status page ships inside the package (no CDN: the machines are often offline).
    web = "fedprune/aggregator/status_web/"
    assert {web + name for name in ("index.html", "app.js", "style.css")} <= set(contents["package_data"])
