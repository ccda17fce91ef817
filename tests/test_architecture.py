"""The import floors of docs/ARCHITECTURE.md hold: no import cycle between ftune's rooms (top-level modules and
subpackages), lazy imports inside functions included, so every room stands above what it uses."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import import_floors  # noqa: E402


def test_no_room_imports_one_that_imports_it_back():
    graph = {room: deps for room, (_, deps) in import_floors.rooms().items()}
    assert {"train", "eval", "config", "data", "methods", "kernels", "layers"} <= set(graph)
    assert import_floors.cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert import_floors.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    floors = import_floors.floors({"top": {"mid"}, "mid": {"ground"}, "ground": set()})
    assert floors == {"top": 3, "mid": 2, "ground": 1}
