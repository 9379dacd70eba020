"""The import direction of docs/architecture.md holds for every module of the package, and the check catches a
wrong import."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medjdt"
DOC = ROOT / "docs" / "architecture.md"


def allowed_imports() -> dict[str, set[str] | None]:
    """``{package: the packages it may import}`` from the doc's table; None means every package."""
    text = DOC.read_text()
    section = text[text.index("## Import direction") :].split("\n## ")[0]
    table: dict[str, set[str] | None] = {}
    for line in section.splitlines():
        row = re.fullmatch(r"\| `([\w.]+)` \|(.*)\|", line.strip())
        if not row:
            continue
        name, cell = row.groups()
        table[name] = None if cell.strip() == "every package" else set(re.findall(r"`([\w.]+)`", cell))
    return table


def unit_of(module: str) -> str:
    """``medjdt.metrics.overlap`` -> ``metrics``; ``medjdt.validation`` -> ``validation``; ``medjdt`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(source: str, module: str) -> list[tuple[int, str]]:
    """Every ``medjdt...`` module imported by ``source`` (top level or inside functions), with its line."""
    found = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("medjdt")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("medjdt"):
                found.append((node.lineno, name))
    return found


def wrong_imports(module: str, source: str, table: dict[str, set[str] | None]) -> list[str]:
    """``'medjdt/x.py:12 imports medjdt.y'`` for each import ``table`` does not allow in ``module``."""
    own = unit_of(module)
    if own == "" or table.get(own, set()) is None:
        return []
    allowed = table[own] | {own}
    return [
        f"{module}:{line} imports {target} ({own} may import {sorted(table[own]) or 'nothing of medjdt'})"
        for line, target in imports_of(source, module)
        if unit_of(target) not in allowed and target != "medjdt"
    ]


def package_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def test_the_table_names_every_package():
    table = allowed_imports()
    units = {unit_of(module) for module, _ in package_modules()} - {""}
    assert units - set(table) == set(), "a package is missing from docs/architecture.md's import table"
    for name, allowed in table.items():
        assert allowed is None or allowed <= set(table), f"{name} names an unknown package"


def test_every_import_points_the_documented_way():
    table = allowed_imports()
    problems = []
    for module, path in package_modules():
        problems += wrong_imports(module, path.read_text(), table)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    "module, source, wrong",
    [
        ("medjdt.losses.jdt", "from medjdt.models.module import SegmentationModule\n", True),
        ("medjdt.metrics.overlap", "def f():\n    import medjdt.data.io\n", True),
        ("medjdt.data.io", "from ..reporting import tables\n", True),
        ("medjdt.metrics.overlap", "from medjdt.losses import jdt_loss\nfrom . import calibration\n", False),
        ("medjdt.cli.session", "from medjdt.reporting import study\n", False),
    ],
)
def test_the_check_catches_a_wrong_import(module, source, wrong):
    assert bool(wrong_imports(module, source, allowed_imports())) is wrong
