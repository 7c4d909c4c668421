"""The code's shape, kept (issue 22): a reader follows a run through few files. No module
imports more than 12 of hftrain's own, parsing a recipe loads neither torch nor transformers
(so `hftrain --help` and recipe checks stay instant), and `train.py` reads in one sitting."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "hftrain"
MAX_HFTRAIN_IMPORTS = 12


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def hftrain_imports(path: Path) -> set[str]:
    """Every hftrain module `path` imports, at the top or inside a function (`from hftrain.data
    import cache` counts as `hftrain.data.cache`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "hftrain"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hftrain":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if is_module(sub) else node.module)
    return found - {module_name(path)}


def test_no_module_imports_more_than_twelve_of_hftrains_own():
    counts = {module_name(p): hftrain_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}
    assert len(counts) > 30  # the walk found the package
    over = {name: sorted(found) for name, found in counts.items()
            if len(found) > MAX_HFTRAIN_IMPORTS}
    assert not over, over


def test_parsing_a_recipe_loads_neither_torch_nor_transformers(tmp_path):
    recipe = REPO / "recipes" / "shakespeare" / "gpt2-char.yaml"
    code = ("import sys\nfrom hftrain.recipe import load_recipe\n"
            f"recipe = load_recipe({str(recipe)!r}, ['train.max_steps=3'])\n"
            "assert recipe.train.max_steps == 3\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout
    assert out.strip() == "[]", out


def test_train_py_reads_in_one_sitting():
    """`train.py` at most 350 lines, and its loop (`fit`) fits on one screen."""
    source = (PACKAGE / "train.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 350
    fit = next(node for node in ast.parse(source).body
               if isinstance(node, ast.FunctionDef) and node.name == "fit")
    assert fit.end_lineno - fit.lineno + 1 <= 60
