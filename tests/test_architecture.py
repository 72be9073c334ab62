"""The import rules of docs/architecture.md: which tokensft packages may import which, and who imports trl."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tokensft"
ALLOWED = {
    "losses": set(),
    "data": set(),
    "models": set(),
    "io": set(),
    "options": set(),
    "tokens": set(),
    "runtime": set(),
    "lora": set(),
    "tracing": {"losses", "models", "tracing"},
    "trainer": {"losses", "data", "models", "tracing", "trainer", "lora"},
    "analysis": {"tracing", "analysis"},
    "eval": {"models", "data", "eval"},
    "viz": {"analysis", "tracing", "viz"},
}


def _imports(path: Path) -> set[tuple[str, ...]]:
    """Absolute module paths imported by a file (relative imports resolved against the package)."""
    rel = path.relative_to(SRC.parent).with_suffix("").parts  # ('tokensft', 'losses', 'core')
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {tuple(a.name.split(".")) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = rel[: len(rel) - node.level]
                out.add(base + tuple((node.module or "").split(".")) if node.module else base)
            elif node.module:
                out.add(tuple(node.module.split(".")))
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_rules(package):
    files = [SRC / f"{package}.py"] if (SRC / f"{package}.py").exists() else sorted((SRC / package).rglob("*.py"))
    for f in files:
        for mod in _imports(f):
            if mod[:1] == ("tokensft",) and len(mod) > 1:
                target = mod[1]
                if package == "viz" and target == "tracing":
                    assert mod[:3] == ("tokensft", "tracing", "schema"), f"{f}: viz may only use tracing.schema"
                if package == "analysis" and target == "tracing":
                    assert mod[:3] == ("tokensft", "tracing", "schema"), f"{f}: analysis may only use tracing.schema"
                # tokensft.io (atomic file writes), tokensft.options (option declarations), tokensft.tokens (token
                # text and categories) and tokensft.runtime (CPU threads per phase) depend on nothing and serve all
                assert target in ALLOWED[package] | {package, "io", "options", "tokens", "runtime"}, \
                    f"{f} imports tokensft.{target}"
            if package != "trainer" and mod[:1] == ("trl",):
                raise AssertionError(f"{f} imports trl; only tokensft.trainer may")
            if package == "losses":
                assert mod[:1] not in {("transformers",), ("trl",)}, f"{f} imports {'.'.join(mod)}"
