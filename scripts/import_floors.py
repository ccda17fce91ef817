"""ftune's modules as floors: each room (a top-level module, or a subpackage taken whole) stands above every room
it imports, lazily imported names included. Prints the floors from the top and any import cycle between rooms
(a cycle is an arrow that runs back up); exits 1 when there is one.

    python scripts/import_floors.py            # the floors, top first, with each room's lines
    python scripts/import_floors.py --arrows   # also every arrow (room -> rooms it imports)
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def room_of(module: str) -> str | None:
    """ftune.train.loop -> train; ftune.models -> models; anything outside ftune -> None."""
    parts = module.split(".")
    if parts[0] != "ftune" or len(parts) == 1:
        return None
    return parts[1]


def rooms(package: Path = ROOT / "ftune") -> dict[str, tuple[int, set[str]]]:
    """room -> (lines of code, rooms it imports)."""
    out: dict[str, tuple[int, set[str]]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        room = room_of(module)
        if room is None or room == "__init__":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative: resolve against this module's package
                    pkg = module.split(".")[: len(module.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                    base = ".".join(pkg + [node.module])
                names.add(base)
                names |= {f"{base}.{a.name}" for a in node.names}
        lines, deps = out.get(room, (0, set()))
        deps |= {r for n in names if (r := room_of(n)) is not None and r != room}
        out[room] = (lines + len(path.read_text(encoding="utf-8").splitlines()), deps)
    known = set(out)  # `from ftune import x` names a room x only when x is one
    return {r: (n, deps & known) for r, (n, deps) in out.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one room (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """1 + the highest floor among the rooms a room imports (ground floor 1); rooms in a cycle share one."""
    memo: dict[str, int] = {}

    def floor(v: str, seen: frozenset) -> int:
        if v in memo:
            return memo[v]
        below = [floor(w, seen | {v}) for w in graph.get(v, ()) if w not in seen and w != v]
        memo[v] = 1 + max(below, default=0)
        return memo[v]

    return {v: floor(v, frozenset()) for v in graph}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arrows", action="store_true", help="print every room's imports too")
    args = p.parse_args()
    found = rooms()
    graph = {r: deps for r, (_, deps) in found.items()}
    level = floors(graph)
    for r in sorted(graph, key=lambda r: (-level[r], r)):
        extra = f"  -> {', '.join(sorted(graph[r]))}" if args.arrows and graph[r] else ""
        print(f"floor {level[r]:2d}  {r}  {found[r][0]}{extra}")
    loops = cycles(graph)
    print(f"{len(graph)} rooms, {sum(len(d) for d in graph.values())} arrows, {len(loops)} cycles"
          + "".join(f"\ncycle: {' <-> '.join(c)}" for c in loops))
    return 1 if loops else 0


if __name__ == "__main__":
    sys.exit(main())
