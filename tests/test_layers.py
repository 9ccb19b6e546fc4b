"""The package's layering, read from the source (an AST walk, so function-level imports count too).

Layers, lowest first; a module may import its own layer and the layers below it, never above:

    base      bft (the lazy public API), bft.atomic, bft.environment
    kernels   bft.kernels.*                        torch, triton and the standard library only, nothing of bft
    loss      bft.loss.*, bft.reference, bft.chunked
    hf        bft.hf.*                             models, chat, data, batching, generation
    decoding  bft.decoding.*                       Eq. 7
    apps      bft.analysis.*, bft.eval.*, bft.trainer.*   peers: none imports another
              (bft.integrations.* is in the trainer's layer: it imports bft.trainer, which never imports it)
    pipelines bft.pipelines.*
    cli       bft.cli, bft.commands.*, bft.__main__       nothing imports them

Also: every bft import names a module that exists, no import cycles between modules, no private (``_name``) import
from another module, and library code never imports the root ``bft`` package (its lazy names are for users).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder, as pyproject.toml maps them
PACKAGE_DIRS = {"bft": ROOT / "bft", "bft.kernels": ROOT / "kernels", "bft.trainer": ROOT / "trainer"}

LAYERS = [  # (layer, module prefixes), lowest first
    ("base", ("bft", "bft.atomic", "bft.environment")),
    ("kernels", ("bft.kernels",)),
    ("loss", ("bft.loss", "bft.reference", "bft.chunked")),
    ("hf", ("bft.hf",)),
    ("decoding", ("bft.decoding",)),
    ("analysis", ("bft.analysis",)),
    ("eval", ("bft.eval",)),
    ("trainer", ("bft.trainer", "bft.integrations")),
    ("pipelines", ("bft.pipelines",)),
    ("cli", ("bft.cli", "bft.commands", "bft.__main__")),
]
RANK = {
    "base": 0,
    "kernels": 1,
    "loss": 2,
    "hf": 3,
    "decoding": 4,
    "analysis": 5,
    "eval": 5,
    "trainer": 5,
    "pipelines": 6,
    "cli": 7,
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "bft" and parts and parts[0] in ("kernels", "trainer"):
                continue
            found[name] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> str:
    best = None
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (layer, prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer: add it to tests/test_layers.py")
    return best[0]


def _imports(module: str, path: Path):
    """(imported module, imported names, line) for every bft import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bft":
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] != "bft":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            if submodules:
                for sub in submodules:
                    yield sub, [], node.lineno
                rest = [n for n in names if f"{base}.{n}" not in MODULES]
                if rest:
                    yield base, rest, node.lineno
            else:
                yield base, names, node.lineno


def _edges():
    for module, path in sorted(MODULES.items()):
        for target, names, line in _imports(module, path):
            if target != module:
                yield module, target, names, f"{path.relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_every_import_names_a_module_that_exists():
    bad = [
        f"{where}: {source} imports {target}, which does not exist"
        for source, target, _, where in _edges()
        if target not in MODULES
    ]
    assert not bad, "\n".join(bad)


def test_imports_point_down_the_layers():
    bad = []
    for source, target, names, where in _edges():
        s, t = layer_of(source), layer_of(target)
        if target == "bft" and source != "bft" and names != ["__version__"]:
            bad.append(f"{where}: {source} imports the root package's lazy API; import the defining module")
        elif RANK[t] > RANK[s] or (RANK[t] == RANK[s] and s != t):
            bad.append(f"{where}: {source} ({s}) imports {target} ({t})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_kernels_import_only_torch_triton_and_the_standard_library():
    allowed = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)
    bad = []
    for module, path in MODULES.items():
        if layer_of(module) != "kernels":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {t}" for t in tops if t not in allowed]
    assert not bad, "\n".join(bad)


def test_no_private_names_cross_modules():
    bad = [
        f"{where}: {source} imports {n} from {target}"
        for source, target, names, where in _edges()
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for source, target, _, _ in _edges():
        if target in MODULES:
            graph.setdefault(source, set()).add(target)
    # a package's __init__ re-exporting its submodules is not a cycle with them
    for source in graph:
        graph[source] = {t for t in graph[source] if not source.startswith(t + ".")}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_trainer_never_imports_the_integrations():
    """bft.integrations shares the trainer's layer but the imports point one way: integrations -> trainer."""
    bad = [
        f"{where}: {source} imports {target}"
        for source, target, _, where in _edges()
        if source.startswith("bft.trainer") and target.startswith("bft.integrations")
    ]
    assert not bad, "\n".join(bad)
