"""The import graph of a package: its modules, their levels, the arrows between them, cycles, and upward imports.

    python tools/import_graph.py [PACKAGE_DIR]        # default: hf_dpo next to this folder

Every ``import``/``from ... import`` of the package's own modules is an arrow, including
the ones inside functions (listed apart as "deferred"). A module's level is the length
of the longest chain of arrows below it (0: imports nothing of the package); modules in
a cycle share one level. With the stage order of docs/architecture.md, an arrow from a
stage to a later one ("upward", against the pipeline) is listed.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

# The pipeline, first to last; a stage may import its own modules and earlier stages only.
STAGES = ("common", "data", "tokenization", "layouts", "scoring", "reference", "losses", "training", "cli")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, name: str, package: str, modules: set[str]) -> list[tuple[str, bool]]:
    """``(imported module, deferred)`` for every import of the package's own modules in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node, name, path.name == "__init__.py")
            # "from .x import y": y may be a module of its own (from .layouts import padded).
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target.split(".")[0] == package:
                found.append((target, id(node) not in top_level))
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components, each a sorted list of modules."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

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
            result.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def analyse(root: Path) -> dict:
    package = root.name
    files = sorted(root.rglob("*.py"))
    names = {module_name(p, root): p for p in files}
    modules = set(names)
    arrows: dict[str, set[str]] = defaultdict(set)
    deferred: set[tuple[str, str]] = set()
    for name, path in names.items():
        arrows[name]
        for target, lazy in imports_of(path, name, package, modules):
            arrows[name].add(target)
            if lazy:
                deferred.add((name, target))
    components = strongly_connected(arrows)
    component_of = {m: i for i, c in enumerate(components) for m in c}
    level: dict[int, int] = {}

    def depth(c: int) -> int:
        if c not in level:
            level[c] = 0
            below = {component_of[t] for m in components[c] for t in arrows[m]} - {c}
            level[c] = 1 + max((depth(b) for b in below), default=-1)
        return level[c]

    levels = {m: depth(component_of[m]) for m in modules}
    upward = sorted(
        (a, b)
        for a, targets in arrows.items()
        for b in targets
        if stage_of(a) and stage_of(b) and STAGES.index(stage_of(b)) > STAGES.index(stage_of(a))
    )
    return {
        "modules": sorted(modules),
        "arrows": sorted((a, b) for a, t in arrows.items() for b in t),
        "deferred": sorted(deferred),
        "cycles": [c for c in components if len(c) > 1],
        "levels": levels,
        "upward": upward,
        "lines": {m: len(names[m].read_text(encoding="utf-8").splitlines()) for m in modules},
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "hf_dpo"
    graph = analyse(root.resolve())
    depth = max(graph["levels"].values()) + 1
    print(
        f"{len(graph['modules'])} modules, {depth} levels, {len(graph['arrows'])} arrows "
        f"({len(graph['deferred'])} deferred), {len(graph['cycles'])} cycles, {len(graph['upward'])} upward"
    )
    for lvl in range(depth):
        members = [m for m in graph["modules"] if graph["levels"][m] == lvl]
        print(f"  level {lvl}: {', '.join(members)}")
    for cycle in graph["cycles"]:
        print(f"  cycle: {' <-> '.join(cycle)}")
    for a, b in graph["upward"]:
        print(f"  upward: {a} -> {b}")


if __name__ == "__main__":
    main()
