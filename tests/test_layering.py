"""The layering reads one way: ops ← data ← trainer runtime ← commands and benches (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("plait.trainer.cli", "plait.trainer.data_walk", "plait.trainer.train_command", "plait.trainer.__main__")
"""Command-line modules: they may import anything; runtime code never imports them."""
BENCHES = "plait.trainer.bench"
EVALUATION = "plait.trainer.evaluate"
LOOP = "plait.trainer.train"
"""The train loop runs the held-out evaluation; no other runtime module imports evaluation code."""


def module_name(path: Path) -> str:
    """`plait.<package>.<module>` of a source file in data/, ops/ or trainer/."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("plait", *parts)).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every plait module a source file imports (at module level or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("plait"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("plait"))
    return names


SOURCES = sorted(p for folder in ("data", "ops", "trainer") for p in (ROOT / folder).rglob("*.py"))


def _forbidden(module: str) -> tuple[str, ...]:
    """Import prefixes `module` may not use."""
    if module.startswith("plait.ops"):
        return ("plait.data", "plait.trainer")
    if module.startswith("plait.data"):
        return ("plait.trainer",)
    if module in COMMANDS or module.startswith(BENCHES):
        return ()
    evaluation = () if module in (LOOP, EVALUATION) else (EVALUATION,)
    return (*COMMANDS, BENCHES, *evaluation)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_only_lower_layers(path: Path) -> None:
    module = module_name(path)
    bad = sorted(name for name in imports(path) for prefix in _forbidden(module)
                 if name == prefix or name.startswith(prefix + "."))
    assert not bad, f"{module} imports {bad}"


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from plait.trainer.bench.model import make_batch\n")
    assert "plait.trainer.bench.model" in imports(source)
    assert any("plait.trainer.bench.model".startswith(p) for p in _forbidden("plait.trainer.engine"))
    assert _forbidden("plait.data.loader") == ("plait.trainer",)
