"""The package's layers import only downwards (README, "Layout").

Every ``import`` statement of every module is read from its source (function-level imports
included), so a lazy import that climbs a layer is caught as well as a top-level one.
"""
import ast
from pathlib import Path

import pytest

import fastxc

ROOT = Path(fastxc.__file__).parent

# layer -> the fastxc packages its modules may import, besides their own package
ALLOWED = {
    "kernels": set(),
    "core": {"kernels", "_C"},
    "data": {"core", "kernels", "_C"},
    "train": {"data", "core", "kernels", "_C"},
    "analysis": {"data", "core", "kernels", "_C"},
    "interop": {"data", "core", "kernels", "_C"},
    # command-line packages: a docstring __init__ and the ``python -m`` entry (__main__.py, top)
    "export": set(),
    "store": set(),
    "organism": {"train", "analysis", "data", "core", "kernels", "_C"},
    "study": {"organism", "train", "analysis", "data", "core", "kernels", "_C"},
}
# the top: the command line (fastxc/cli.py and every ``python -m`` entry, __main__.py) and the
# package's own __init__ may import any layer


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _fastxc_imports(path: Path) -> list[tuple[int, str]]:
    """(line, first part under fastxc) of every import of a fastxc module in ``path``."""
    found = []
    package = ".".join(("fastxc",) + path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            # "from fastxc import X" imports the subpackage X
            names = [f"{mod}.{a.name}" for a in node.names] if mod == "fastxc" else [mod]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "fastxc" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def _is_top(path: Path) -> bool:
    return path.name == "__main__.py" or (path.parent == ROOT and path.stem in ("cli", "__init__"))


def _modules():
    return sorted(p for p in ROOT.rglob("*.py") if not _is_top(p))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    layer = _layer(path)
    assert layer in ALLOWED, f"{path.relative_to(ROOT)}: module outside the layers; add it to README's layout table"
    bad = [(line, target) for line, target in _fastxc_imports(path)
           if target != layer and target not in ALLOWED[layer]]
    assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports a higher layer: {bad}"


def test_the_check_sees_a_violation(tmp_path):
    """The scanner finds a function-level import and a 'from fastxc import X' form."""
    mod = ROOT / "core" / "_probe_layers.py"
    src = "def f():\n    from fastxc.analysis import diff\n    from fastxc import train\n"
    mod.write_text(src)
    try:
        assert [t for _, t in _fastxc_imports(mod)] == ["analysis", "train"]
    finally:
        mod.unlink()


def test_kernels_import_nothing_of_fastxc():
    for path in (ROOT / "kernels").rglob("*.py"):
        assert not _fastxc_imports(path) or {t for _, t in _fastxc_imports(path)} == {"kernels"}, path


def _layout_rows() -> dict[str, str]:
    """README's layout table: the package folder of each row -> the row's text."""
    readme = (ROOT.parent / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1].startswith("`fastxc/") and cells[1].endswith("/`"):
            rows[cells[1].strip("`").split("/")[1]] = cells[2]
    return rows


def test_readme_layout_table_matches_the_tree():
    """Every layer package has its row, and each row names every public module in it."""
    rows = _layout_rows()
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert sorted(rows) == packages, (sorted(rows), packages)
    for pkg, text in rows.items():
        for mod in sorted((ROOT / pkg).glob("*.py")):
            if mod.name.startswith("_"):
                continue
            named = f"`{mod.name}`" in text or f"`{mod.stem}`" in text or (
                mod.stem.startswith("triton_") and "`triton_*.py`" in text)
            assert named, f"README's layout row for fastxc/{pkg}/ does not name {mod.name}"
