"""The import graph keeps STYLE.md's layering (read from the source with ast, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_CORE = ("worker", "pynetdicom", "highdicom", "celery", "sqlalchemy", "alembic", "kombu", "redis")
# Outside worker/db, SQLAlchemy may appear only as types and errors (sessions are passed in), never statements.
SQL_OUTSIDE_DB_ALLOWED = {
    "sqlalchemy.orm": {"Session", "sessionmaker"},
    "sqlalchemy.exc": None,
    "sqlalchemy": {"Engine"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


def test_core_never_imports_the_service_or_its_frameworks() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if _top(n) in FORBIDDEN_IN_CORE)
        for path in _modules("ccfnet_core")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_bridge_imports_the_model_library() -> None:
    importers = [
        str(path.relative_to(ROOT))
        for path in _modules("worker")
        if any(_top(n) in ("ccfnet_core", "torch") for n in _imports(path))
    ]
    assert importers == ["worker/core_bridge.py"]


def test_listener_handlers_never_touch_the_model() -> None:
    for path in _modules("worker/listener"):
        assert not any(_top(n) in ("ccfnet_core", "torch", "worker.core_bridge") for n in _imports(path)), path
        assert "worker.core_bridge" not in _imports(path)


def _sqlalchemy_names(path: Path) -> list[tuple[str, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and _top(node.module) == "sqlalchemy":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "*") for alias in node.names if _top(alias.name) == "sqlalchemy"]
    return found


def test_only_the_db_package_issues_sql() -> None:
    offenders = []
    for path in _modules("worker"):
        if str(path.relative_to(ROOT)).startswith("worker/db/"):
            continue
        for module, name in _sqlalchemy_names(path):
            allowed = SQL_OUTSIDE_DB_ALLOWED.get(module, set())
            if allowed is not None and name not in allowed:
                offenders.append(f"{path.relative_to(ROOT)}: {module}.{name}")
    assert offenders == []
