"""The architecture of docs/architecture.md holds: layer rules, module size, one concept each.

The layer rules are import-linter contracts in pyproject.toml (`make lint` runs the same
check); a broken contract fails the suite here with import-linter's report of the chain.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "personanet"

#: a module longer than this holds more than one concept (issue 11)
MAX_MODULE_LINES = 450
#: modules over the limit today, with their length when the limit came in: each is a debt to
#: pay by splitting it, never a place to grow. Lower a number as a module shrinks, and remove
#: the entry once it is under the limit (the test says so).
OVERSIZED: dict[str, int] = {
    "personanet.reporting.metrics": 464,
}

#: the packages allowed to hold one module importing both torch and polars: the stages join
#: frames (polars) and tensors (torch); every other package knows at most one of them
FRAMES_MEET_TENSORS = ("personanet.stages",)
#: modules outside the stages that import both today: a debt, to be paid by moving the
#: frame-to-tensor step into the stages (the encoder's `transform` reads a frame and returns
#: tensors), then removed from here (the test says when)
MIXED_TODAY: frozenset[str] = frozenset({"personanet.models.encoding"})


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_import_linter_contracts_are_kept() -> None:
    # A child process: import-linter's CLI closes the streams it prints to, which would take
    # pytest's captured stderr down with it.
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint_imports), "--no-cache", "--config",
                           str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, (f"a layer rule of docs/architecture.md is broken:\n"
                                  f"{done.stdout}{done.stderr}")


def test_no_module_is_over_the_line_limit() -> None:
    sizes = {_name(p): len(p.read_text("utf-8").splitlines()) for p in _modules()}
    over = {name: n for name, n in sizes.items()
            if n > max(MAX_MODULE_LINES, OVERSIZED.get(name, 0))}
    assert not over, (f"modules over {MAX_MODULE_LINES} lines (split them by concept): "
                      f"{over}")
    paid = sorted(name for name in OVERSIZED if sizes.get(name, 0) <= MAX_MODULE_LINES)
    assert not paid, f"remove from OVERSIZED, now under {MAX_MODULE_LINES} lines: {paid}"


def test_every_module_names_its_concept_in_a_docstring() -> None:
    missing = [_name(p) for p in _modules()
               if p.name != "__main__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring naming their concept: {missing}"


def test_only_the_stages_import_torch_and_polars_together() -> None:
    # Imports under `if TYPE_CHECKING:` are annotations only: they do not count.
    graph = grimp.build_graph("personanet", include_external_packages=True,
                              exclude_type_checking_imports=True, cache_dir=None)
    mixed = set()
    for module in graph.modules:
        if not module.startswith("personanet") or module.startswith(FRAMES_MEET_TENSORS):
            continue
        imported = {name.split(".")[0] for name in graph.find_modules_directly_imported_by(module)}
        if {"torch", "polars"} <= imported:
            mixed.add(module)
    assert mixed <= MIXED_TODAY, (f"{sorted(mixed - MIXED_TODAY)} import both torch and polars: "
                                  "frames meet tensors in the stages only")
    assert not MIXED_TODAY - mixed, f"remove from MIXED_TODAY: {sorted(MIXED_TODAY - mixed)}"
