"""The package's layers (DESIGN.md, "Shape"): a lower layer never imports a higher one; and no module of the
package is longer than 500 lines.

Every module under ``connito/`` and ``kernels/`` (installed as ``connito.kernels``, setup.py) is parsed with
``ast``, nothing is imported; every ``import``/``from ... import`` counts wherever it stands (module level, inside a
function, under ``TYPE_CHECKING``), and so does ``importlib.import_module("<a literal name>")``. Callbacks named by
string in the trainer's table (``"module:Class"``) are not imports and are not read here.

The layer table, as DESIGN.md lists it (the same table is in ``connito/__init__.py``). DESIGN.md's layer 5 holds
the methods and ``orchestration`` running them; inside it ``analysis`` sits below the other methods (5a < 5b) and
``orchestration`` above them (5c). Layer 0 is what DESIGN.md puts below everything: the package root, ``kernels``
(top level, "used from layers 2-5"; ``experts/lean`` uses it too, which the rule allows) and ``common``.

===  ==========================================  =====================================================
 0   ``connito`` (the package root: its version)  imports nothing of Connito
 0   ``kernels``                                  Triton kernels + torch fallback; imports nothing of Connito
 0   ``common``                                   plain-Python helpers (atomic writes, records); the same
 1   ``models``, ``experts``, ``data``            may import each other
 2   ``routing``
 3   ``parallel``
 4   ``training``
 5a  ``analysis``                                 the method below the other methods (they read its scores)
 5b  ``adaptation``, ``composition``,             methods: never import each other; what they share goes
     ``retirement``                               down a layer
 5c  ``orchestration``                            runs the methods as pipelines of jobs; never imports ``cli``
 6   ``cli``, ``__main__``                        the faces: import anything
===  ==========================================  =====================================================

A module may import its own package, any package of a lower layer, and (layers 1 and 6 only) the other packages of
its layer.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: dict[str, str] = {
    "": "0",
    "kernels": "0",
    "common": "0",
    "models": "1",
    "experts": "1",
    "data": "1",
    "routing": "2",
    "parallel": "3",
    "training": "4",
    "analysis": "5a",
    "adaptation": "5b",
    "composition": "5b",
    "retirement": "5b",
    "orchestration": "5c",
    "cli": "6",
    "__main__": "6",
}
"""Top-level package of ``connito`` (``""``: the package root) -> its layer; layers order as strings."""

PEERS_MAY_IMPORT_EACH_OTHER = {"1", "6"}
"""Layers whose packages may import one another; at every other layer two packages are independent."""

ALLOWED: dict[tuple[str, str], str] = {}
"""(importing module, imported module) -> why this upward import stays for now. Keep it empty."""


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for ``connito/`` and ``kernels/`` as installed (``connito.kernels``)."""
    modules = {}
    for top, prefix in (("connito", ("connito",)), ("kernels", ("connito", "kernels"))):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(prefix) + list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """The Connito modules ``source`` (the text of ``module``) imports, with their line numbers."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule if submodule in known else target, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, node.lineno))
    connito = [(name, line) for name, line in found if name == "connito" or name.startswith("connito.")]
    return sorted(connito, key=lambda found_at: found_at[1])


def package_of(module: str) -> str:
    """``connito.training.step`` -> ``training``; ``connito`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``; None when the table allows it."""
    own, other = package_of(importer), package_of(imported)
    if own not in LAYERS:
        return f"{importer}: package '{own}' is not in the layer table (add it to LAYERS and DESIGN.md)"
    if other not in LAYERS:
        return f"{importer} imports {imported}: package '{other}' is not in the layer table"
    if own == other or LAYERS[other] < LAYERS[own]:
        return None
    if LAYERS[other] == LAYERS[own]:
        if LAYERS[own] in PEERS_MAY_IMPORT_EACH_OTHER:
            return None
        return f"{importer} (layer {LAYERS[own]}) imports {imported}, another package of its layer"
    return f"{importer} (layer {LAYERS[own]}) imports {imported} (layer {LAYERS[other]}), a higher layer"


@functools.cache
def all_imports() -> list[tuple[Path, str, str, int]]:
    """(file, its module, the Connito module it imports, line) for every module of the package."""
    modules = module_files()
    found = []
    for module, path in modules.items():
        source = path.read_text(encoding="utf-8")
        for imported, line in imports_of(source, module, path.name == "__init__.py", set(modules)):
            found.append((path, module, imported, line))
    return found


def violations() -> list[str]:
    found = []
    for path, module, imported, line in all_imports():
        why = violation(module, imported)
        if why and (module, imported) not in ALLOWED:
            found.append(f"{path.relative_to(ROOT)}:{line}: {why}")
    return found


def test_no_module_imports_a_higher_layer():
    found = violations()
    assert not found, "upward imports (move the shared code down a layer):\n" + "\n".join(found)


def test_every_package_is_in_the_layer_table():
    packages = {package_of(module) for module in module_files()}
    assert packages == set(LAYERS), f"not in the table: {packages - set(LAYERS)}; gone: {set(LAYERS) - packages}"


def test_allow_list_entries_are_still_needed():
    present = {(module, imported) for _, module, imported, _ in all_imports()}
    stale = [pair for pair in ALLOWED if pair not in present]
    assert not stale, f"allow-list entries whose import is gone (remove them): {stale}"


def test_layer_table_is_the_one_in_the_package_docstring():
    text = (ROOT / "connito" / "__init__.py").read_text(encoding="utf-8")
    for package in LAYERS:
        if package:
            assert f"``{package}``" in text, f"connito/__init__.py's layer table does not name {package}"


MAX_LINES = 500
"""Longest module in ``connito/`` and ``kernels/`` (STYLE.md: files of 150-400 lines): split a longer one by
responsibility."""


def test_no_module_is_longer_than_500_lines():
    long = {
        str(path.relative_to(ROOT)): lines
        for path in module_files().values()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


SOURCE = """
import torch
from connito.models import families
from . import sibling
from .. import training
from ..cli.paths import config_dir

def later():
    from connito.adaptation import selection
    import importlib
    importlib.import_module("connito.orchestration.plan")
"""


def test_the_checker_sees_every_kind_of_import():
    known = {"connito.models.families", "connito.analysis.sibling", "connito.training", "connito.cli.paths"}
    found = imports_of(SOURCE, "connito.analysis.probe", False, known)
    assert found == [
        ("connito.models.families", 3),
        ("connito.analysis.sibling", 4),
        ("connito.training", 5),
        ("connito.cli.paths", 6),
        ("connito.adaptation", 9),
        ("connito.orchestration.plan", 11),
    ]
    verdicts = {name: violation("connito.analysis.probe", name) for name, _ in found}
    assert [name for name, why in verdicts.items() if why] == [
        "connito.cli.paths",
        "connito.adaptation",
        "connito.orchestration.plan",
    ]


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("connito.experts.view", "connito.models.families", True),  # layer 1 peers
        ("connito.models.loading", "connito.routing.observer", False),
        ("connito.adaptation.selection", "connito.analysis.statistics", True),  # analysis sits below methods
        ("connito.analysis.run", "connito.adaptation.selection", False),
        ("connito.retirement.pruning", "connito.composition.flexolmo", False),  # methods do not import each other
        ("connito.orchestration.btx", "connito.composition.btx_merge", True),
        ("connito.orchestration.recipe", "connito.cli.paths", False),
        ("connito.cli.main", "connito.orchestration.runner", True),
        ("connito.experts.lean.forward", "connito.kernels", True),
        ("connito.kernels", "connito.models", False),
        ("connito.kernels", "connito.common", False),
        ("connito.__main__", "connito.cli.main", True),
        ("connito.composition.fft_moe.server", "connito", True),
    ],
)
def test_the_rule(importer, imported, allowed):
    assert (violation(importer, imported) is None) == allowed
