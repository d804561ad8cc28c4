"""The shape of the code (docs/decisions.md, "Apps"): `runs` is the domain, `telemetry`
uses it. These tests read the source, deferred imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = ("runs", "telemetry")


def imports(package: str) -> list[tuple[str, int, str, list[str]]]:
    """(file, line, module, names) of every import in a package, at any depth."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.append((str(path.relative_to(ROOT)), node.lineno, alias.name, []))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [alias.name for alias in node.names]
                found.append((str(path.relative_to(ROOT)), node.lineno, node.module, names))
    return found


def app_of(module: str) -> str:
    return module.split(".")[0]


def test_the_runs_app_never_imports_telemetry():
    wrong = [
        f"{file}:{line} imports {module}"
        for file, line, module, _ in imports("runs")
        if app_of(module) == "telemetry"
    ]
    assert not wrong, "runs is the domain; telemetry uses it, never the reverse:\n" + "\n".join(
        wrong
    )


@pytest.mark.parametrize("package", APPS)
def test_no_app_imports_private_names_of_another(package):
    wrong = [
        f"{file}:{line} imports {name} from {module}"
        for file, line, module, names in imports(package)
        if app_of(module) in APPS and app_of(module) != package
        for name in names
        if name.startswith("_")
    ]
    assert not wrong, "\n".join(wrong)


def test_the_import_check_sees_deferred_imports(tmp_path, monkeypatch):
    # A late import inside a function counts as much as one at the top.
    package = tmp_path / "runs"
    package.mkdir()
    (package / "late.py").write_text("def f():\n    from telemetry.models import Span\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert [(m, n) for _, _, m, n in imports("runs")] == [("telemetry.models", ["Span"])]


def test_every_spooled_batch_kind_has_one_receiver():
    from telemetry.models import IngestBatch
    from telemetry.receivers import RECEIVERS

    spooled = {kind for kind, receiver in RECEIVERS.items() if receiver.spooled}
    assert spooled == set(IngestBatch.Kind.values)
    assert all(receiver.kind == kind for kind, receiver in RECEIVERS.items())
