"""The package layout: imports run one way through the layers, and no import circle exists.

Every import counts, including those inside functions (a circle hidden in a function is still a circle).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "adamix_ds"

LAYERS = [
    ("foundation", ("adamix_ds.config", "adamix_ds.arguments", "adamix_ds.builtin_models", "adamix_ds.model_source",
                    "adamix_ds.hashing", "adamix_ds.version")),
    ("distributed", ("adamix_ds.distributed",)),
    ("data", ("adamix_ds.data",)),
    ("methods", ("adamix_ds.methods",)),
    ("export", ("adamix_ds.export",)),
    ("training", ("adamix_ds.training",)),
    ("entry", ("adamix_ds.cli", "adamix_ds")),
]
"""Bottom to top: a module may import its own layer and the layers below it, never one above."""

METHOD_FAMILIES = ("adamix_ds.methods.adamix", "adamix_ds.methods.routed")
"""Sibling families: neither imports the other; the shared methods modules import neither (only the registry
sees both)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every adamix_ds module `name` imports (`from pkg import mod` counts as mod when mod is a module)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("adamix_ds"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("adamix_ds"):
                continue
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in MODULES else source)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int:
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = index, len(prefix)
    assert best is not None, f"{name} belongs to no layer; add it to LAYERS"
    return best


def _family(name: str) -> str | None:
    return next((f for f in METHOD_FAMILIES if name == f or name.startswith(f + ".")), None)


def test_every_module_is_in_a_layer():
    for name in MODULES:
        _layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(name):
    above = sorted(m for m in GRAPH[name] if _layer(m) > _layer(name))
    assert not above, f"{name} ({LAYERS[_layer(name)][0]}) imports {above} from a layer above"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("adamix_ds.methods.")))
def test_method_families_stay_apart(name):
    mine = _family(name)
    others = sorted(m for m in GRAPH[name] if _family(m) not in (None, mine))
    if name == "adamix_ds.methods.registry":
        return
    assert not others, f"{name} imports {others}: a family's modules (or the shared ones) import no other family"


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return circles


def test_no_import_circle():
    assert not import_circles(GRAPH), f"import circles: {import_circles(GRAPH)}"


def test_the_checks_catch_what_they_claim():
    """A circle through three modules is found; an upward import, a lazy one included, is seen and refused."""
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []
    trainer = _imports("adamix_ds.training.recipe")
    assert "adamix_ds.training.adamix_trainer" in trainer and "adamix_ds.distributed" in trainer
    assert _layer("adamix_ds.training.recipe") > _layer("adamix_ds.export.merged_model")
    assert _family("adamix_ds.methods.routed.moa_set") == "adamix_ds.methods.routed"
    assert _family("adamix_ds.methods.targets") is None
