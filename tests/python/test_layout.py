"""Imports flow one way: daemon → server → engine/prompt → the rest of edgelm. The
engine and the prompt code never import the HTTP side or the process, and the HTTP
side never imports the process (so each can be tested, and reused, without what sits
above it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "edgelm"

# package → packages it must not import (at any depth, type-only imports included)
FORBIDDEN = {
    "engine": ("edgelm.server", "edgelm.daemon"),
    "prompt": ("edgelm.server", "edgelm.daemon", "edgelm.engine"),
    "server": ("edgelm.daemon",),
}


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def test_imports_flow_one_way() -> None:
    bad = []
    for pkg, forbidden in FORBIDDEN.items():
        for path in sorted((PACKAGE / pkg).glob("*.py")):
            for name in _imports(path):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_old_flat_package_is_gone() -> None:
    assert not (PACKAGE / "serve").exists()
    for path in PACKAGE.rglob("*.py"):
        assert not any(n == "edgelm.serve" or n.startswith("edgelm.serve.") for n in _imports(path)), path
