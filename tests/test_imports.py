"""kd_jax/methods/ never imports the loop, the stage runner or the flags (`kd_jax.train`,
`kd_jax.run`, `kd_jax.main`), at module level or inside a function: a method only reads
finished workdirs and is handed its teacher."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = os.path.join(ROOT, "kd_jax", "methods")
FORBIDDEN = ("kd_jax.train", "kd_jax.run", "kd_jax.main")


def imported_modules(path, package="kd_jax.methods"):
    """Every module an `import` / `from ... import` anywhere in the file names (for `from kd_jax
    import train`, `kd_jax.train` too; relative imports resolved within `package`)."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts) if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            yield module
            for alias in node.names:
                yield f"{module}.{alias.name}"


def test_imported_modules_sees_function_level_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "def f():\n    from kd_jax import train\n    import kd_jax.run as r\n"
        "    from .. import main\n"
    )
    assert {"kd_jax.train", "kd_jax.run", "kd_jax.main"} <= set(imported_modules(str(path)))


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(METHODS) if f.endswith(".py")))
def test_methods_never_import_the_loop_runner_or_flags(name):
    path = os.path.join(METHODS, name)
    bad = sorted(
        {
            m
            for m in imported_modules(path)
            if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)
        }
    )
    assert not bad, f"kd_jax/methods/{name} imports {bad}"
