"""The import graph of sae_zoo: no cycles, counting imports inside functions and under TYPE_CHECKING.
(The layer order itself is import-linter's contract in pyproject.toml, run by ``make test``.)"""

import subprocess
import sys
from pathlib import Path

import grimp


def import_cycles(package: str) -> list[set[str]]:
    """The groups of modules that import each other, directly or through others (Tarjan's algorithm)."""
    graph = grimp.build_graph(package, exclude_type_checking_imports=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(group)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_sae_zoo_has_no_import_cycles():
    assert import_cycles("sae_zoo") == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from . import b\n")  # inside a function: still an import
    (package / "b.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclic") == [{"cyclic.a", "cyclic.b"}]


LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")
ROOT = Path(__file__).resolve().parents[1]


def test_the_layer_contract_holds():
    result = subprocess.run([LINT_IMPORTS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout + result.stderr


def test_the_layer_check_catches_an_upward_import(tmp_path):
    config = tmp_path / "upside_down.ini"  # the model above the CLI: the CLI imports the model, so it must break
    config.write_text("[importlinter]\nroot_package = sae_zoo\n\n[importlinter:contract:upside-down]\n"
                      "name = upside down\ntype = layers\nlayers =\n    sae_zoo.model\n    sae_zoo.cli\n")
    result = subprocess.run([LINT_IMPORTS, "--config", str(config)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "1 broken" in result.stdout, result.stdout + result.stderr
