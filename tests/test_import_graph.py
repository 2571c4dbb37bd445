"""The house's arrows: no import circle among tilevlm's modules, and every import goes to the same
room or to a room below it in the data flow (README's Layout). Counted from the source, so an
import inside a function or under `if TYPE_CHECKING:` is an arrow too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tilevlm"

# Rooms from the bottom up: a module may import its own room and the rooms before it
# ("tilevlm" is the package's face, tilevlm/__init__.py: the version and the config's names).
ROOMS = ("files", "host_memory", "special_tokens", "config", "tilevlm", "device",
         "preprocessing", "model", "weights", "data", "inference", "serving", "evaluation",
         "training", "bench", "demo", "integrations", "commands", "cli", "__main__")


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["tilevlm", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every tilevlm module `module` imports, wherever the import statement stands."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:  # a name imported from a module
                target = target.rsplit(".", 1)[0]
            if target in known and target != module:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for name in sorted(edges):
        if name not in index:
            visit(name)
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_finder_sees_every_kind_of_import(tmp_path):
    known = {"tilevlm.a": tmp_path / "a.py", "tilevlm.b": tmp_path / "b.py",
             "tilevlm.c": tmp_path / "c.py", "tilevlm.d": tmp_path / "d.py"}
    (tmp_path / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tilevlm.b import X\n"
        "def f():\n    from tilevlm import c\n    import tilevlm.d\n")
    assert imported("tilevlm.a", tmp_path / "a.py", known) == {"tilevlm.b", "tilevlm.c",
                                                                "tilevlm.d"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert cycles(graph()) == []


def test_every_import_goes_down_the_data_flow():
    unknown = sorted({room(m) for m in module_names()} - set(ROOMS))
    assert not unknown, f"rooms missing from ROOMS (and README's Layout): {unknown}"
    upward = sorted(f"{module} -> {target}" for module, targets in graph().items()
                    for target in targets
                    if ROOMS.index(room(target)) > ROOMS.index(room(module)))
    assert upward == []


def test_readme_layout_names_every_module():
    """README's Layout is the map of the house: every package and module file is in it."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    missing = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        folder = path.parent.name + "/"
        named = path.name in layout or re.search(rf"\b{path.stem}\b", layout)  # commands by name
        if not named or (path.parent != PACKAGE and folder not in layout):
            missing.append(str(path.relative_to(PACKAGE)))
    assert missing == [], f"README's Layout does not name {missing}"
