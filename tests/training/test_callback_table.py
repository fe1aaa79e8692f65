"""Built-in callbacks come from one table (name -> "module:Class"), imported on lookup: no import side effects."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connito.training.callbacks import (
    BUILTIN_CALLBACKS,
    Callback,
    CallbackError,
    build_callbacks,
    register_callback,
    registered_callbacks,
    resolve_callback,
)
from connito.training.callbacks import registry as registry_module
from connito.training.config import ConnitoConfig
from connito.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
METHOD_PACKAGES = ("connito.adaptation", "connito.composition", "connito.retirement", "connito.orchestration")


def callback_classes_in_source() -> dict[str, set[str]]:
    """Every class under connito/ that derives from Callback (by the names its bases spell), read from the source
    without importing anything: ``"module:Class" -> {its base names}``."""
    classes: list[tuple[str, set[str]]] = []  # (module:Class, base names)
    for path in sorted((ROOT / "connito").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                classes.append((f"{module}:{node.name}", names))
    found: dict[str, set[str]] = {}
    grew = True
    while grew:
        grew = False
        for target, names in classes:
            if target not in found and ("Callback" in names or names & {t.split(":")[1] for t in found}):
                found[target] = names
                grew = True
    found.pop("connito.training.callbacks.base:Callback", None)
    return found


def test_the_table_names_every_callback_connito_defines(tmp_path):
    defined = callback_classes_in_source()
    always_on = {f"{type(c).__module__}:{type(c).__qualname__}" for c in Trainer(ConnitoConfig(), tmp_path).callbacks}
    bases = {t for t in defined if any(t.split(":")[1] in names for names in defined.values())}
    assert always_on <= set(defined)
    assert set(defined) - always_on - bases == set(BUILTIN_CALLBACKS.values())
    assert len(set(BUILTIN_CALLBACKS.values())) == len(BUILTIN_CALLBACKS)
    assert not (tmp_path / "checkpoints").exists()  # building the trainer's callbacks writes nothing


def test_no_connito_module_registers_by_decorator():
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "connito").rglob("*.py")
        if "@register_callback(" in path.read_text(encoding="utf-8")
        and path.name not in ("registry.py", "base.py")  # the decorator itself and its docstring example
    ]
    assert offenders == []


def test_every_table_entry_resolves_to_its_class():
    for name, target in BUILTIN_CALLBACKS.items():
        cls = resolve_callback(name)
        assert f"{cls.__module__}:{cls.__qualname__}" == target and issubclass(cls, Callback)
    assert set(BUILTIN_CALLBACKS) <= set(registered_callbacks())


def test_an_unknown_name_lists_every_known_name():
    with pytest.raises(CallbackError) as err:
        resolve_callback("des_moee")
    listed = str(err.value).split("(registered: ")[1].split(")")[0].split(", ")
    assert str(err.value).startswith("callback 'des_moee' is not registered (registered: ")
    assert set(BUILTIN_CALLBACKS) <= set(listed) and listed == sorted(listed)
    assert "plugins='[my_pkg.callbacks]'" in str(err.value)


def test_a_user_callback_registers_and_cannot_take_a_builtin_name_by_accident(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", {})

    @register_callback("my_method")
    class Mine(Callback):
        def __init__(self, coef: float = 0.1):
            self.coef = coef

    (built,) = build_callbacks({"my_method": {"coef": 0.5}})
    assert isinstance(built, Mine) and built.coef == 0.5 and built.name == "my_method"
    assert "my_method" in registered_callbacks()
    with pytest.raises(CallbackError, match=r"^a callback named 'des_moe' is built in; pass replace=True"):
        register_callback("des_moe")(Mine)
    register_callback("des_moe", replace=True)(Mine)
    assert resolve_callback("des_moe") is Mine


PLAIN_PYTHON = """
import json, sys
from connito.training.config import ConnitoConfig
from connito.training.trainer import Trainer, run_training  # the plain-Python entry point, nothing else
from connito.training.callbacks import BUILTIN_CALLBACKS, resolve_callback
methods = {methods!r}
before = sorted(m for m in sys.modules if m.startswith(methods))
resolved = {{n: f"{{c.__module__}}:{{c.__qualname__}}" for n in BUILTIN_CALLBACKS for c in [resolve_callback(n)]}}
cfg = ConnitoConfig(callbacks={{"des_moe": {{}}, "progressive_prune": {{"target": 1, "window": 2}}}})
built = [type(c).__name__ for c in Trainer(cfg, sys.argv[1]).callbacks[:2]]
print(json.dumps({{"before": before, "resolved": resolved, "built": built}}))
"""


@pytest.mark.slow  # a fresh interpreter imports torch and transformers (~6 s of CPU)
def test_plain_python_finds_every_builtin_without_importing_the_methods_first(tmp_path):
    code = PLAIN_PYTHON.format(methods=METHOD_PACKAGES)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"] == []
    assert result["resolved"] == BUILTIN_CALLBACKS
    assert result["built"] == ["DesMoe", "ProgressivePrune"]
