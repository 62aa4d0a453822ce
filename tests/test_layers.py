"""The import graph matches the layers: core <- eval <- fed <- pipeline <- cli/demo.

Every ``synthct`` module belongs to one layer by where it lives; no module imports (at top
level or inside a function) a module of a higher layer, so each layer can be read, tested and
reused without the ones above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"synthct": ROOT / "synthct", "synthct.eval": ROOT / "eval", "synthct.fed": ROOT / "fed"}
LAYERS = ["core", "eval", "fed", "pipeline", "entry points"]


def layer(module: str) -> str:
    if module in ("synthct.cli", "synthct.demo") or module.startswith(
        ("synthct.cli.", "synthct.demo.")
    ):
        return "entry points"
    for prefix, name in (
        ("synthct.pipeline", "pipeline"),
        ("synthct.fed", "fed"),
        ("synthct.eval", "eval"),
    ):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "core"


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "synthct" and parts and parts[0] in ("pretrained",) and len(parts) > 1:
                continue  # shipped data folders
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` may import; ``from P import name`` also counts ``P.name``, which
    is a submodule when ``name`` is one (``from synthct import cli``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                base = (
                    module.split(".")[: -node.level]
                    if path.name != "__init__.py"
                    else module.split(".")[: len(module.split(".")) - node.level + 1]
                )
                source = ".".join([*base, node.module] if node.module else base)
            elif node.module:
                source = node.module
            else:
                continue
            out |= {source} | {f"{source}.{a.name}" for a in node.names if a.name != "*"}
    return {m for m in out if m == "synthct" or m.startswith("synthct.")}


def test_the_check_sees_submodules_imported_by_name(tmp_path):
    source = tmp_path / "lowly.py"
    source.write_text("from synthct import cli\nfrom . import demo\n")
    found = imports(source, "synthct.lowly")
    assert {"synthct.cli", "synthct.demo"} <= found
    assert {layer(m) for m in ("synthct.cli", "synthct.demo")} == {"entry points"}


def test_no_module_imports_a_higher_layer():
    found = modules()
    assert "synthct.pipeline.downstream" in found and "synthct.fed.task" in found
    upward = []
    for module, path in sorted(found.items()):
        mine = LAYERS.index(layer(module))
        for target in sorted(imports(path, module)):
            theirs = LAYERS.index(layer(target))
            if theirs > mine:
                upward.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    assert not upward, "\n".join(upward)
