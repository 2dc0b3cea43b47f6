"""Check the code's structure: which layer imports which, and how long the aggregator's parts are.

    .venv/bin/python scripts/check_architecture.py            # imports and lengths
    .venv/bin/python scripts/check_architecture.py --wheel    # also build the wheel, list its names

Layers, bottom to top (each may import those below it and itself, nothing above):

    fedprune.converters                 every byte format; imports nothing else of ours
    fedprune (the base)                 task, data, models, pruning, transport, ...: + converters
    fedprune.aggregator, .edge_agent    + base; never each other
    fedprune.simulation                 simulator, fleet, attacks, report: may import all

Every import statement counts, those inside functions and under ``TYPE_CHECKING`` too. Code must
use the installed names (``fedprune.aggregator``): an import of a folder's bare name
(``aggregator``, ``converters``, ``edge_agent``, ``simulation``) works only from a checkout and is
reported. Lengths: ``aggregator/server.py`` at most 300 lines and no function in it over 40; no
function elsewhere in ``aggregator/`` over 60 (a function counts from its ``def`` line to its
last line, docstring included).

tests/test_architecture.py runs the same checks. Last line: JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: What each layer may import, besides itself.
ALLOWED: dict[str, set[str]] = {
    "converters": set(),
    "base": {"converters"},
    "aggregator": {"base", "converters"},
    "edge_agent": {"base", "converters"},
    "simulation": {"base", "converters", "aggregator", "edge_agent"},
}
FOLDER_NAMES = ("aggregator", "converters", "edge_agent", "simulation")
SERVER_MAX_LINES = 300
SERVER_MAX_FUNCTION = 40
AGGREGATOR_MAX_FUNCTION = 60


@dataclass(frozen=True)
class Arrow:
    """One import from module ``source`` (in layer ``source_layer``) of module ``target``."""

    source: str
    target: str
    source_layer: str
    target_layer: str
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.source} ({self.source_layer}) imports {self.target} ({self.target_layer})"


def package_folders(root: Path = ROOT) -> dict[str, Path]:
    """Import name -> folder, for ``fedprune`` and each package pyproject.toml maps elsewhere."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"fedprune": root / "fedprune"}
    folders.update({name: root / folder for name, folder in setuptools.get("package-dir", {}).items()})
    return folders


def declared_packages(root: Path = ROOT) -> list[str]:
    return list(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the distribution: dotted name -> file."""
    out: dict[str, Path] = {}
    folders = package_folders(root)
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            # a folder mapped to its own package is walked under that name, not under fedprune's
            if not any(name.startswith(other + ".") or name == other
                       for other in folders if other != package and other.startswith(package + ".")):
                out[name] = path
    return out


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of ours, or None for third-party modules."""
    parts = module.split(".")
    if parts[0] != "fedprune":
        return None
    if len(parts) > 1 and parts[1] in FOLDER_NAMES:
        return parts[1]
    return "base"


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``path``; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from fedprune import aggregator`` imports a subpackage: count it as such
            subpackages = [(f"{base}.{alias.name}", node.lineno) for alias in node.names
                           if layer_of(base) == "base" and layer_of(f"{base}.{alias.name}") != "base"]
            out.extend(subpackages or [(base, node.lineno)])
    return out


def wrong_arrows(root: Path = ROOT) -> list[Arrow]:
    """Every import of ours that runs the wrong way between layers."""
    bad = []
    for module, path in modules(root).items():
        source_layer = layer_of(module)
        for target, line in _imports(path, module):
            target_layer = layer_of(target)
            if target_layer is None or target_layer == source_layer:
                continue
            if target_layer not in ALLOWED[source_layer]:
                bad.append(Arrow(module, target, source_layer, target_layer,
                                 f"{path.relative_to(root)}:{line}"))
    return bad


def bare_imports(root: Path = ROOT) -> list[str]:
    """Imports of a folder's bare name (``import aggregator``) anywhere in the repository's code."""
    found = []
    folders = [*package_folders(root).values(), root / "tests", root / "scripts", root / "examples"]
    files = [p for folder in folders if folder.is_dir() for p in folder.rglob("*.py")]
    for path in sorted(files):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found.extend(f"{path.relative_to(root)}:{node.lineno}: {name}" for name in names
                         if name.split(".")[0] in FOLDER_NAMES)
    return found


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function and method in ``path``, longest first."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((f"{prefix}{child.name}", child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return sorted(out, key=lambda item: -item[1])


def aggregator_lengths(root: Path = ROOT) -> dict:
    """server.py's length and longest function; the longest function elsewhere in aggregator/."""
    server = root / "aggregator" / "server.py"
    longest_server = (function_lengths(server) or [("", 0)])[0]
    elsewhere = [(f"{p.relative_to(root)}:{name}", n) for p in sorted((root / "aggregator").rglob("*.py"))
                 if p != server for name, n in function_lengths(p)]
    elsewhere.sort(key=lambda item: -item[1])
    return {
        "server_py_lines": len(server.read_text().splitlines()),
        "server_longest_function": {"name": longest_server[0], "lines": longest_server[1]},
        "aggregator_longest_function_elsewhere": {"name": elsewhere[0][0], "lines": elsewhere[0][1]}
        if elsewhere else None,
        "aggregator_functions_over_limit": [f"{name} ({n})" for name, n in elsewhere if n > AGGREGATOR_MAX_FUNCTION],
        "server_functions_over_limit": [f"{name} ({n})" for name, n in function_lengths(server)
                                        if n > SERVER_MAX_FUNCTION],
    }


def wheel_contents(root: Path = ROOT) -> dict:
    """Build the wheel; its top-level import names, the modules it is missing, if any, the files
    it ships that are not Python (package data: the status page), its licence metadata, and the
    build's deprecation warnings (setuptools warns about an outdated ``project.license``)."""
    with tempfile.TemporaryDirectory() as tmp:
        # Built from a copy: setuptools leaves build/ in the tree it builds.
        source = Path(tmp) / "src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy(root / name, source / name)
        for folder in package_folders(root).values():
            shutil.copytree(folder, source / folder.relative_to(root), ignore=shutil.ignore_patterns("__pycache__"))
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", tmp, str(source)],
                               check=True, capture_output=True, text=True)
        wheel = next(Path(tmp).glob("fedprune-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))})
    shipped = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    missing = sorted(set(modules(root)) - shipped)
    data = sorted(n for n in names if not n.endswith(".py") and not n.split("/")[0].endswith(".dist-info"))
    warnings = sorted({line.strip() for line in (build.stdout + build.stderr).splitlines()
                       if "DeprecationWarning" in line or "deprecated" in line.lower()})
    licence = [line for line in metadata.splitlines() if line.startswith(("License-Expression:", "License-File:"))]
    return {"top_level": top, "missing_modules": missing, "package_data": data, "license": licence,
            "build_warnings": warnings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", action="store_true", help="also build the wheel and list its top-level names")
    args = parser.parse_args(argv)
    arrows = wrong_arrows()
    bare = bare_imports()
    lengths = aggregator_lengths()
    for arrow in arrows:
        print(f"wrong way: {arrow}")
    for line in bare:
        print(f"bare folder name: {line}")
    for key in ("server_functions_over_limit", "aggregator_functions_over_limit"):
        for item in lengths[key]:
            print(f"too long ({key}): {item}")
    result = {"modules": len(modules()), "wrong_arrows": [str(a) for a in arrows], "bare_imports": bare, **lengths}
    if args.wheel:
        result["wheel"] = wheel_contents()
    ok = (not arrows and not bare and lengths["server_py_lines"] <= SERVER_MAX_LINES
          and not lengths["server_functions_over_limit"] and not lengths["aggregator_functions_over_limit"]
          and (not args.wheel or (result["wheel"]["top_level"] == ["fedprune"]
                                  and not result["wheel"]["missing_modules"]
                                  and not result["wheel"]["build_warnings"])))
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
