"""The architecture: one-way layers, no import cycles, small modules, one installable namespace.

The import graph is read from the source (every ``import`` statement, including those inside functions, which
is where cycles used to hide); imports under ``if TYPE_CHECKING:`` are type annotations only and are skipped.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"bench": "clcompose.bench", "strategies": "clcompose.strategies"}

# Layers inside each package: a module may import its own subpackage and the layers below it, never above.
BENCH_LAYERS = {
    "io": 0,
    "data": 1,
    "models": 2,
    "runs": 3,
    "sweeps": 4,
    "report": 5,
    "perf": 6,
    "cli": 7,
    "__main__": 8,
}
STRATEGY_LAYERS = {
    "_torchvision_compat": 0,
    "core": 1,
    "metrics": 1,
    "task_vectors": 2,
    "prompts": 2,
    "baselines": 3,  # SLCA reuses task_vectors' class statistics and classifier alignment
    "meta": 2,
    "templates": 3,
}
MAX_LINES = 450
LONG_MODULES_WITH_A_REASON: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, name in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The suite's modules that ``module`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in known and name != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, set(modules)) for m, p in modules.items()}


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if parts[1] == "bench":
        return "bench", BENCH_LAYERS.get(parts[2], -1) if len(parts) > 2 else -1
    return "strategies", STRATEGY_LAYERS.get(parts[2], -1) if len(parts) > 2 else -1


def test_strategies_never_import_bench(graph):
    wrong = sorted(
        f"{m} → {d}"
        for m, deps in graph.items()
        if m.startswith("clcompose.strategies")
        for d in deps
        if d.startswith("clcompose.bench")
    )
    assert not wrong, wrong


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components of the import graph: every one must be a single module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, cycles


def test_imports_run_down_the_layers(graph):
    """Within each package, a module imports only its own subpackage and lower layers (see the layer tables)."""
    unknown = sorted(m for m in graph if _layer(m)[1] < 0 and m not in PACKAGES.values())
    assert not unknown, f"modules outside every layer (add their subpackage to the layer table): {unknown}"
    wrong = []
    for m, deps in graph.items():
        if m in PACKAGES.values():
            continue
        pkg, level = _layer(m)
        for d in deps:
            if d in PACKAGES.values():
                continue
            dpkg, dlevel = _layer(d)
            same_subpackage = m.split(".")[:3] == d.split(".")[:3]
            if dpkg == pkg and not same_subpackage and dlevel >= level:
                wrong.append(f"{m} → {d}")
    assert not wrong, wrong


def test_modules_stay_small():
    long = {
        str(p.relative_to(REPO)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert set(long) <= set(LONG_MODULES_WITH_A_REASON), f"modules over {MAX_LINES} lines: {long}"


def test_importing_every_strategies_module_loads_no_bench_module():
    names = [m for m in _modules() if m.startswith("clcompose.strategies")]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('clcompose.bench')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", r.stdout


def test_pyproject_lists_every_package():
    """setuptools gets an explicit package list (the folders map into the clcompose namespace): a new
    subpackage must be added there, or a wheel would silently lack it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert on_disk <= listed, sorted(on_disk - listed)
    assert listed - on_disk == {"clcompose.profiles", "clcompose.examples"}, sorted(listed - on_disk)
    assert config["package-dir"] == {
        "clcompose.bench": "bench",
        "clcompose.strategies": "strategies",
        "clcompose.profiles": "slurm/profiles",
        "clcompose.examples": "examples",
    }


def test_public_surface():
    """The names a user of the library imports (lazily: `import clcompose.strategies` stays cheap)."""
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, clcompose.strategies as s; print('torch' in sys.modules); "
            "from clcompose.strategies import ITA, IEL, TaskArithmetic, TaskVectorPool, TrainConfig, ClassIncrementalNet, "
            "STRATEGIES, ITAOptions, IELOptions, TaskArithmeticOptions; print(ITA.__name__, sorted(s.__all__) == sorted(dir(s)))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["False", "ITA", "True"], r.stdout


def test_code_is_formatted_without_exemptions():
    """ruff format owns the layout (CI runs `ruff format --check`); no statement opts out of it."""
    marked = [str(p.relative_to(REPO)) for p in _modules().values() if "fmt: " + "skip" in p.read_text()]
    marked += [p.name for p in (REPO / "tests").glob("*.py") if "fmt: " + "skip" in p.read_text()]
    assert not marked, marked
