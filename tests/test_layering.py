"""The package's import graph flows one way: a module never imports from a floor above its own.

Floors (issue 9): 0 pure helpers any floor may use (``validation.metrics``, ``compare``,
``imresize``: no project imports) -> 1 ``models`` -> 2 ``runtimes`` -> 3 ``export`` ->
4 apps (``apps``, ``benchmarks``, ``validation.parity``, ``validation.bicubic_baseline``).
Every import counts: module level, inside functions, under ``TYPE_CHECKING``, relative.
A lower floor that reaches up makes the layers a cycle: a runner that needs the exporter
cannot ship without it, and a change to an app can break a runtime.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Path (relative to the repository root) -> floor; the longest matching prefix wins.
FLOORS: dict[str, int] = {
    "validation/__init__.py": 0,
    "validation/metrics.py": 0,
    "validation/compare.py": 0,
    "validation/imresize.py": 0,
    "models/": 1,
    "runtimes/": 2,
    "export/": 3,
    "validation/": 4,
    "benchmarks/": 4,
    "apps/": 4,
}

@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    imported: str
    module_floor: int
    imported_floor: int

    def __str__(self) -> str:
        return (f"{self.module}:{self.line} (floor {self.module_floor}) imports {self.imported} "
                f"(floor {self.imported_floor})")


def floor_of(relpath: str, floors: dict[str, int]) -> int | None:
    """The floor of a repository-relative path, or None when no prefix claims it."""
    matches = [prefix for prefix in floors if relpath == prefix or (prefix.endswith("/") and relpath.startswith(prefix))]
    return floors[max(matches, key=len)] if matches else None


def module_file(root: Path, dotted: str) -> Path | None:
    """The file that defines ``dotted`` under ``root`` (module or package), else None."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _candidates(node: ast.Import | ast.ImportFrom, package: str) -> list[list[str]]:
    """Per imported name, the dotted names it may load (``from X import y``: ``X.y``, else ``X``)."""
    if isinstance(node, ast.Import):
        return [[alias.name] for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
    return [[f"{base}.{alias.name}", base] for alias in node.names]


def _resolve(root: Path, names: list[str]) -> tuple[str, Path] | None:
    """The first name (or its longest importable prefix) that is a project module."""
    for name in names:
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            path = module_file(root, ".".join(parts[:end]))
            if path is not None:
                return ".".join(parts[:end]), path
    return None


def find_violations(root: Path, floors: dict[str, int] = FLOORS) -> tuple[list[Violation], list[str]]:
    """(upward imports, project modules no floor claims) for every module of ``root``'s packages."""
    violations: set[Violation] = set()
    unassigned: list[str] = []
    packages = sorted(p.parent.name for p in root.glob("*/__init__.py") if p.parent.name != "tests")
    for path in sorted(f for pkg in packages for f in (root / pkg).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        own = floor_of(rel, floors)
        if own is None:
            unassigned.append(rel)
            continue
        package = rel.rsplit("/", 1)[0].replace("/", ".")
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for names in _candidates(node, package):
                target = _resolve(root, names)
                if target is None:
                    continue  # not a project module (standard library, third party)
                target_floor = floor_of(target[1].relative_to(root).as_posix(), floors)
                if target_floor is not None and target_floor > own:
                    violations.add(Violation(rel, node.lineno, target[0], own, target_floor))
    return sorted(violations, key=lambda v: (v.module, v.line, v.imported)), unassigned


def test_every_module_has_a_floor() -> None:
    assert find_violations(REPO)[1] == [], "give these modules a floor in FLOORS"


def test_no_module_imports_from_a_floor_above() -> None:
    found = find_violations(REPO)[0]
    assert not found, "upward imports:\n" + "\n".join(map(str, found))


def test_checker_catches_a_synthetic_upward_import(tmp_path: Path) -> None:
    """A gate that cannot fail is a defect: plant upward imports and see each one named."""
    files = {
        "models/__init__.py": "",
        "models/core.py": "import numpy\nfrom validation.metrics import psnr\n",
        "runtimes/__init__.py": "",
        "runtimes/runner.py": ("from models import core\n\n\ndef build():\n"
                               "    from export.writer import write  # upward, inside a function\n"
                               "    return write\n"),
        "export/__init__.py": "from .writer import write\n",
        "export/writer.py": "from ..runtimes import runner\n\n\ndef write():\n    pass\n",
        "validation/__init__.py": "",
        "validation/metrics.py": "import validation.parity\n",
        "validation/parity.py": "from export import writer\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    violations, unassigned = find_violations(tmp_path)
    assert unassigned == []
    assert [str(v) for v in violations] == [
        "runtimes/runner.py:5 (floor 2) imports export.writer (floor 3)",
        "validation/metrics.py:1 (floor 0) imports validation.parity (floor 4)",
    ]
