"""kiln's import graph: no cycles, and every import goes down the layer order of docs/design.md.

Every import of a kiln module is read from the source (module level and inside functions alike;
`if TYPE_CHECKING:` blocks are left out, they never run). Three rules:

1. No cycles, counting function-level imports too (a cycle hidden inside a function is still one).
   The one edge left out is the rule registry loading its plug-ins (kiln.rules -> kiln.build_rules.*),
   which import kiln.rules back: that is what a plug-in registry is.
2. A module imports only modules of its own layer or the layers below it.
3. A kiln module is imported inside a function only when it is heavy (it imports one of HEAVY at
   module level, itself or through kiln modules it imports), so that planning and the no-op build
   do not pay for it; or from the command line, which imports what each command needs.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

# Lowest first. A name covers a module and, for a package, everything in it.
LAYERS: list[tuple[str, ...]] = [
    ("kiln", "kiln.errors", "kiln.base"),  # leaves: version, errors, files, hashes, digests, tools, env, sys.path, CUDA facts
    ("kiln._native", "kiln.native"),  # the C++ kernels and their Python wrappers and numpy twins
    ("kiln.rules", "kiln.runtime"),  # the rule plug-in API; what rules use while they run
    ("kiln.schema",),  # reading TOML, the pydantic pieces formats and sources share, error messages
    ("kiln.sources",),  # one module per source kind
    ("kiln.formats",),  # one module per target format
    ("kiln.build_rules",),  # one module per rule
    ("kiln.define",),  # the Spec (formats x sources) and resolving its paths
    ("kiln.plan",),  # pure: spec -> steps
    ("kiln.state",),  # what a build leaves: records, up-to-date decision, cache, lockfile, report, fresh
    ("kiln.execute",),  # running one step
    ("kiln.engine",),  # doit glue
    ("kiln.cli",),  # the command line
]
# Importing one of these costs tenths of a second (or needs a GPU library): keep them off the paths
# that must stay fast (planning imports no numpy; the no-op build imports no pydantic).
HEAVY = {"numpy", "torch", "onnx", "onnxruntime", "onnxsim", "pydantic", "transformers", "tokenizers", "openvino",
         "tensorrt", "ml_dtypes", "safetensors", "sklearn", "skl2onnx", "joblib", "cuda",
         "tensorflow", "keras", "tf2onnx", "coremltools", "ai_edge_litert", "xgboost", "lightgbm", "onnxmltools",
         "sklearn2pmml", "jpmml_evaluator", "pypmml"}
REGISTRY_EDGE = ("kiln.rules", "kiln.build_rules")
LAZY_IMPORTERS = ("kiln.cli",)


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported kiln module, or a third-party top-level name
    line: int
    at_module_level: bool


def module_names(src: Path, rules: Path) -> dict[str, Path]:
    """kiln module name -> file, for src/kiln and build_rules (shipped as kiln.build_rules)."""
    found = {}
    for base, package in ((src, "kiln"), (rules, "kiln.build_rules")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def resolve(module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def add(target: str, node: ast.AST, top: bool) -> None:
        if target == "kiln" or target.startswith("kiln."):
            while target not in modules and target != "kiln._native" and "." in target:
                target = target.rsplit(".", 1)[0]  # `from kiln.x import name`: the module kiln.x
        else:
            target = target.split(".")[0]
        found.append(Import(name, target, node.lineno, top))

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit_one(sub, top)
                continue
            visit_one(child, top)

    def visit_one(child: ast.AST, top: bool) -> None:
        if isinstance(child, ast.Import):
            for alias in child.names:
                add(alias.name, child, top)
        elif isinstance(child, ast.ImportFrom):
            module = resolve(child.module, child.level)
            for alias in child.names:  # `from kiln import _native` / `from kiln.native import twins`: submodules
                full = f"{module}.{alias.name}"
                add(full if full in modules or full == "kiln._native" else module, child, top)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(child, False)
        else:
            visit(child, top)

    visit(tree, True)
    return found


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    if index is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS (and to docs/design.md)")
    return index


def _kiln(target: str) -> bool:
    return target == "kiln" or target.startswith("kiln.")


def _registry_edge(edge: Import) -> bool:
    return edge.source == REGISTRY_EDGE[0] and edge.target.startswith(REGISTRY_EDGE[1])


def heavy_modules(graph: dict[str, list[Import]]) -> set[str]:
    """Kiln modules whose import imports a HEAVY package (directly or through kiln modules) at module level."""
    heavy = {m for m, edges in graph.items() if any(e.at_module_level and e.target in HEAVY for e in edges)} | {"kiln._native"}
    grew = True
    while grew:
        grew = False
        for module, edges in graph.items():
            if module not in heavy and any(e.at_module_level and e.target in heavy for e in edges):
                heavy.add(module)
                grew = True
    return heavy


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Every elementary cycle's nodes, one per strongly connected component of more than one module
    (or a module importing itself), found with Tarjan's algorithm."""
    succ = {m: sorted({e.target for e in edges if _kiln(e.target) and e.target in graph and not _registry_edge(e)}) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in succ[v]:
                found.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            strongconnect(v)
    return found


def problems(src: Path, rules: Path) -> list[str]:
    modules = module_names(src, rules)
    graph = {name: imports_of(name, path, modules) for name, path in sorted(modules.items())}
    found = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    heavy = heavy_modules(graph)
    for module, edges in graph.items():
        for edge in edges:
            if not _kiln(edge.target) or edge.target == module or _registry_edge(edge):
                continue
            if layer_of(edge.target) > layer_of(module):
                found.append(f"{module}:{edge.line} imports {edge.target}, a higher layer")
            if not edge.at_module_level and edge.target not in heavy and not module.startswith(LAZY_IMPORTERS):
                found.append(f"{module}:{edge.line} imports {edge.target} inside a function, but it is light: import it at the top")
    return found


def test_kiln_imports_go_down_the_layers_without_cycles():
    assert problems(REPO / "src" / "kiln", REPO / "build_rules") == []


def test_every_module_has_a_layer():
    for name in module_names(REPO / "src" / "kiln", REPO / "build_rules"):
        layer_of(name)


def test_the_check_fails_on_a_cycle_added_by_hand(tmp_path: Path):
    """Copy the tree, make a leaf import the doit glue inside a function, and see both rules fire."""
    src, rules = tmp_path / "kiln", tmp_path / "build_rules"
    shutil.copytree(REPO / "src" / "kiln", src, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "build_rules", rules, ignore=shutil.ignore_patterns("__pycache__"))
    leaf = src / "base" / "fsio.py"
    leaf.write_text(leaf.read_text() + "\n\ndef _sneaky():\n    from kiln.engine import tasks\n    return tasks\n")
    found = problems(src, rules)
    assert any(p.startswith("import cycle:") and "kiln.base.fsio" in p for p in found), found
    assert any(p.startswith("kiln.base.fsio:") and "imports kiln.engine.tasks, a higher layer" in p for p in found), found


def test_the_no_op_path_is_light():
    """What dodo.py imports before it knows whether anything needs planning imports nothing heavy."""
    modules = module_names(REPO / "src" / "kiln", REPO / "build_rules")
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    heavy = heavy_modules(graph)
    assert "kiln.engine" not in heavy and "kiln.engine.tasks" not in heavy and "kiln.state.fresh" not in heavy
    assert {"kiln.define.spec", "kiln.plan.chains", "kiln.rules"} <= heavy
