"""The two packages' import graph, read with `ast` (imports inside functions count too):
no cycle, and no import against the layering below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("data_pipeline", "pixelbert_dist")

# (importer prefix, imported prefix, why it is forbidden)
FORBIDDEN = [
    ("data_pipeline", "pixelbert_dist", "data_pipeline is the lower layer: the trainer reads its shards"),
    ("pixelbert_dist.data", "pixelbert_dist.model", "batch types live in data/types.py, which the model imports"),
    ("pixelbert_dist.data", "pixelbert_dist.tasks", "the data stages know no task model"),
    ("pixelbert_dist.data", "pixelbert_dist.train", "the data stages know no trainer"),
    ("pixelbert_dist.model", "pixelbert_dist.data.loader", "the model takes batches, not the loader"),
    ("pixelbert_dist.backbone", "pixelbert_dist.data", "the CNN knows no data path"),
    ("pixelbert_dist.config", "pixelbert_dist.", "the config schema is the bottom of the trainer"),
    ("pixelbert_dist.train", "pixelbert_dist.cli", "the command line calls the trainer, never the reverse"),
    ("pixelbert_dist.ray_launcher", "pixelbert_dist.", "the Ray launcher is handed the job's run function"),
]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that `path` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the submodule mod; `from mod import name` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _under(name: str, prefix: str) -> bool:
    return name.startswith(prefix) if prefix.endswith(".") else name == prefix or name.startswith(prefix + ".")


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_packages_import_each_other_without_a_cycle():
    edges = graph()
    assert "pixelbert_dist.train" in edges and "data_pipeline.shard" in edges  # the walk saw the packages
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


@pytest.mark.parametrize("importer,imported,why", FORBIDDEN)
def test_no_import_against_the_layering(importer, imported, why):
    edges = graph()
    wrong = sorted(f"{a} -> {b}" for a, targets in edges.items() if _under(a, importer)
                   for b in targets if _under(b, imported) and not _under(b, importer))
    assert not wrong, f"{why}: {wrong}"
