"""Imports inside the `adapter` package run one way.

Builds the module-level import graph of `adapter` with `ast` (module-level `import` / `from`
statements, relative ones included, `from adapter.x import y` counted as an import of
`adapter.x.y` where y is a submodule; `if TYPE_CHECKING:` blocks are left out because they
never run) and checks:

* no import cycle: no strongly connected component of more than one module;
* every function-level import of an `adapter.*` module is on ALLOWED_LAZY, with its reason
  (function-level imports of third-party packages, such as torch, are not constrained);
* the packages import each other only downwards, in the order docs/ARCHITECTURE.md's
  "Layers" section gives (LAYERS below).

Run as a script (`python tests/test_layering.py`) to print the numbers.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "adapter"

# Heavy third-party packages: a module that imports one of these at its top is "heavy".
HEAVY = ("torch", "transformers", "celery", "flask", "prometheus_client", "gunicorn", "requests")

_CLI = ("`fhir-rerank` builds its parser for every command and `--help`: importing a command's "
        "machinery at the top would load prometheus_client into `serve` before it sets "
        "PROMETHEUS_MULTIPROC_DIR, and Flask, Celery or torch into every command")
_MULTIPROC = ("imports prometheus_client, which must not load before `serve` sets "
              "PROMETHEUS_MULTIPROC_DIR")
_TORCH = "imports torch and transformers, needed only when a model is loaded"

# (module that imports lazily, adapter module it imports) -> why it is not at module level.
# Nothing here dodges a cycle: test_no_import_cycles counts these imports too.
ALLOWED_LAZY: dict[tuple[str, str], str] = {
    ("adapter", "adapter.api.app"):
        "the package root runs before every adapter module: `adapter.create_app` must not "
        "load Flask and the API into workers and the CLI",
    **{("adapter.cli", target): _CLI for target in (
        "adapter.api.params", "adapter.cli_output", "adapter.eval.runner",
        "adapter.jobs.celery_backend", "adapter.jobs.devices", "adapter.jobs.routing",
        "adapter.pipeline", "adapter.runtime", "adapter.server", "adapter.startup")},
    ("adapter.cli", "adapter.rerank.tiny"): _TORCH,
    ("adapter.cli", "adapter.eval.data"): "imported with adapter.eval.runner, beside it",
    ("adapter.interop.context", "adapter.api.app"):
        "the CLI's parser imports adapter.interop; the app " + _MULTIPROC,
    ("adapter.server", "adapter.api.app"): _MULTIPROC,
    ("adapter.server", "adapter.api.state"): _MULTIPROC,
    ("adapter.server", "adapter.metrics"): _MULTIPROC,
    ("adapter.server", "adapter.startup"): _MULTIPROC,
    ("adapter.jobs", "adapter.jobs.celery_backend"):
        "Celery and redis load only when redis_url is set (without it jobs run in-process)",
    ("adapter.interop.runner", "adapter.rerank.tiny"): _TORCH,
    ("adapter.rerank", "adapter.rerank.qwen3"): _TORCH,
    ("adapter.search.hybrid", "adapter.rerank.qwen3"): _TORCH,
    ("adapter.search.hybrid", "adapter.search.dense"): _TORCH,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _resolve(node: ast.ImportFrom | ast.Import, mod: str, is_pkg: bool,
             modules: dict[str, Path]) -> list[str]:
    """The adapter modules one import statement loads (the names it binds, when submodules)."""
    out: list[str] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == "adapter" or alias.name.startswith("adapter."):
                out.append(alias.name)
        return out
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not (target == "adapter" or target.startswith("adapter.")):
        return out
    subs = [f"{target}.{alias.name}" for alias in node.names
            if f"{target}.{alias.name}" in modules]
    if len(subs) < len(node.names):  # some names are the module's own attributes
        out.append(target)
    return out + subs


def _walk(body: list[ast.stmt], top: bool):
    """Yield (import node, at module level?) for every import in a body, skipping
    `if TYPE_CHECKING:` blocks."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _walk(node.orelse, top)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(node.body, False)
        elif isinstance(node, ast.ClassDef):
            yield from _walk(node.body, top)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(node, field, None)
                if isinstance(sub, list):
                    yield from _walk([s for s in sub if isinstance(s, ast.AST)], top)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def scan() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module-level import graph, [(module, adapter module imported lazily, line)]).

    An import of adapter.a.b is an edge to adapter.a.b and to the packages it runs on the way
    (adapter, adapter.a), except the importing module's own packages, which are running
    already; an explicit `from adapter.a import name` is an edge to adapter.a wherever it is."""
    modules = all_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    lazy: list[tuple[str, str, int]] = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        for node, top in _walk(tree.body, True):
            for t in _resolve(node, mod, is_pkg, modules):
                if t not in modules or t == mod:
                    continue
                if top:
                    graph[mod].add(t)
                    graph[mod].update(a for a in _ancestors(t) if a != mod
                                      and not mod.startswith(a + ".") and a in modules)
                else:
                    lazy.append((mod, t, node.lineno))
    return graph, lazy


def full_graph() -> dict[str, set[str]]:
    """Every import, at module level or in a function: what each module needs to work."""
    graph, lazy = scan()
    for mod, t, _ in lazy:
        graph[mod].add(t)
        graph[mod].update(a for a in _ancestors(t) if a != mod
                          and not mod.startswith(a + ".") and a in graph)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """Not at module level (Python would fail to import), and not through function-level
    imports either (a cycle only hidden by an import moved into a function)."""
    graph, _ = scan()
    assert not cycles(graph), f"module-level import cycles: {cycles(graph)}"
    found = cycles(full_graph())
    assert not found, f"import cycles among adapter modules: {found}"


def test_function_level_adapter_imports_are_allowed():
    _, lazy = scan()
    unexplained = sorted({(m, t) for m, t, _ in lazy if (m, t) not in ALLOWED_LAZY})
    assert not unexplained, (
        "function-level imports of adapter modules (move them to module level, or add them to "
        f"ALLOWED_LAZY with the reason): {unexplained}")


def test_allow_list_has_no_stale_entries():
    _, lazy = scan()
    used = {(m, t) for m, t, _ in lazy}
    assert set(ALLOWED_LAZY) <= used, sorted(set(ALLOWED_LAZY) - used)


# The layers, bottom first, as docs/ARCHITECTURE.md's "Layers" section lists them: a module
# imports (at module level or in a function) only modules of its own layer or of lower ones.
# A name stands for that module and everything under it; the longest name that matches wins.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["adapter.version", "adapter.config", "adapter.errors", "adapter.models",
              "adapter.metrics", "adapter.lru", "adapter.caches", "adapter.logsafe",
              "adapter.logs", "adapter.identity", "adapter.deadline", "adapter.retry"]),
    ("fhir", ["adapter.fhir"]),
    ("keyword search", ["adapter.search"]),
    ("rerank", ["adapter.rerank"]),
    ("dense recall", ["adapter.search.dense", "adapter.search.hybrid"]),
    ("runtime", ["adapter.runtime"]),
    ("pipeline", ["adapter.pipeline"]),
    ("jobs", ["adapter.jobs"]),
    ("web", ["adapter.api", "adapter.app", "adapter.readiness"]),
    ("app", ["adapter.api.app", "adapter.startup"]),
    ("entry points", ["adapter", "adapter.server", "adapter.eval", "adapter.interop",
                      "adapter.cli_output", "adapter.cli"]),
]


def layer_of(mod: str) -> int:
    best, index = "", -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (mod == name or mod.startswith(name + ".")) and len(name) > len(best):
                best, index = name, i
    return index


def test_imports_run_down_the_layers():
    graph = full_graph()
    unplaced = [m for m in graph if layer_of(m) < 0]
    assert not unplaced, f"modules in no layer (add them to LAYERS and the doc): {unplaced}"
    upward = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})"
                    for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))
    assert not upward, f"imports that go up the layers: {upward}"


def test_the_architecture_doc_lists_the_layers():
    """docs/ARCHITECTURE.md's "Layers" list is LAYERS: one numbered line per layer, bottom
    first, naming its modules in backticks."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = doc.split("## Layers", 1)[1].split("\n## ", 1)[0]
    listed: list[tuple[str, list[str]]] = []
    for line in section.splitlines():
        found = re.match(r"\d+\. \*\*(.+?)\*\*: (.*)", line)
        if found:
            listed.append((found[1], re.findall(r"`([a-z_.]+)`", found[2])))
        elif listed and line.startswith("   ") and line.strip():  # the item goes on
            listed[-1][1].extend(re.findall(r"`([a-z_.]+)`", line))
    assert listed == LAYERS


# Module-level state that is not a cache: what one process is doing, not a memo of results.
NOT_CACHES = {
    "adapter.server._booting": "the worker process booting now (its heartbeat while loading)",
    "adapter.jobs.celery_backend._worker_queues": "the queues this worker consumes",
    "adapter.jobs.celery_backend._worker_name": "this worker's node name",
    "adapter.jobs.celery_backend._beat": "this worker's heartbeat thread",
}


# The only adapter modules that may import Celery (celery, kombu): everything else in
# adapter.jobs gets what it needs of Celery as plain values or callables.
CELERY_MODULES = {"adapter.jobs.celery_backend"}
CELERY_PACKAGES = ("celery", "kombu")


def celery_imports() -> dict[str, list[int]]:
    """{module: [lines]} of every import of celery or kombu in an adapter module: at module
    level, in a function, under `if TYPE_CHECKING:`, through importlib or __import__."""
    found: dict[str, list[int]] = {}
    for mod, path in all_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and node.args and \
                    isinstance(node.args[0], ast.Constant) and \
                    getattr(node.func, "attr", getattr(node.func, "id", "")) in \
                    ("import_module", "__import__"):
                names = [str(node.args[0].value)]
            if any(n.split(".")[0] in CELERY_PACKAGES for n in names):
                found.setdefault(mod, []).append(node.lineno)
    return found


def test_only_the_celery_module_imports_celery():
    """One module in adapter/ knows Celery: routing, keys, heartbeats, leases, the job body and
    the runners' base import neither celery nor kombu, anywhere."""
    found = celery_imports()
    others = {m: lines for m, lines in found.items() if m not in CELERY_MODULES}
    assert not others, f"modules besides {sorted(CELERY_MODULES)} importing Celery: {others}"
    assert set(found) == CELERY_MODULES  # the Celery module is where the list says


def test_an_api_without_redis_loads_no_celery(tmp_path):
    """Without redis_url jobs run in-process: building the app loads neither celery nor kombu
    (the jobs package loads the Celery module only for redis_url)."""
    probe = ("import os, sys\nos.environ.pop('FHIR_RERANK_REDIS_URL', None)\n"
             "from adapter.api.app import create_app\n"
             "app = create_app({'redis_url': ''})\n"
             "assert app.extensions['fhir_rerank'].jobs.__class__.__name__ == "
             "'InProcessJobRunner'\n"
             "print(' '.join(m for m in ('celery', 'kombu') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == []
    with_redis = probe.replace("{'redis_url': ''}", "{'redis_url': 'redis://127.0.0.1:1/0', "
                               f"'state_dir': {str(tmp_path)!r}}}") \
        .replace("'InProcessJobRunner'", "'CeleryJobRunner'")
    out = subprocess.run([sys.executable, "-c", with_redis], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["celery", "kombu"]  # the probe sees Celery when it loads


def module_caches() -> set[str]:
    """`module.name` of each module-level cache: a function under functools.lru_cache / cache,
    or a module-level dict, list or set that starts empty."""
    found = set()
    for mod, path in all_modules().items():
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    target = dec.func if isinstance(dec, ast.Call) else dec
                    name = target.attr if isinstance(target, ast.Attribute) else \
                        getattr(target, "id", "")
                    if name in ("lru_cache", "cache"):
                        found.add(f"{mod}.{node.name}")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                value = node.value
                empty = (isinstance(value, ast.Dict) and not value.keys) or (
                    isinstance(value, (ast.List, ast.Set)) and not value.elts) or (
                    isinstance(value, ast.Call) and getattr(value.func, "id", "") in
                    ("dict", "set", "list", "OrderedDict") and not value.args and not value.keywords)
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if empty:
                    found.update(f"{mod}.{t.id}" for t in targets if isinstance(t, ast.Name))
    return found


def test_architecture_names_every_module_level_cache():
    """docs/ARCHITECTURE.md lists the module-level caches; every one in the code is there
    (named as `last-module.name`); NOT_CACHES is process state, not a cache."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = []
    for full in sorted(module_caches()):
        if full in NOT_CACHES:
            continue
        mod, name = full.rsplit(".", 1)
        if f"`{mod.rsplit('.', 1)[-1]}.{name}`" not in doc:
            missing.append(full)
    assert not missing, f"module-level caches docs/ARCHITECTURE.md does not name: {missing}"


def _loads(code: str) -> set[str]:
    """The HEAVY packages a fresh interpreter has loaded after running `code`."""
    probe = (f"import sys\n{code}\n"
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


_PARSER = "import adapter.cli\nadapter.cli.build_parser()"


def test_the_cli_parser_loads_nothing_heavy():
    """What keeps the CLI's imports lazy: `fhir-rerank --help` (and `serve` before it sets
    PROMETHEUS_MULTIPROC_DIR) loads none of HEAVY but requests (the FHIR client)."""
    loaded = _loads(_PARSER)
    assert loaded <= {"requests"}, loaded


def test_each_lazy_cli_import_is_heavy():
    """Every adapter module the CLI imports in a function loads a heavy package that the
    parser does not (else it belongs at the top of adapter/cli.py)."""
    base = _loads(_PARSER)
    light = [target for (mod, target), reason in ALLOWED_LAZY.items()
             if mod == "adapter.cli" and reason == _CLI
             and not _loads(f"{_PARSER}\nimport {target}") - base]
    assert not light, f"light modules imported lazily by adapter/cli.py: {light}"


if __name__ == "__main__":
    g, lz = scan()
    cs = cycles(g)
    print(f"modules: {len(g)}; module-level edges: {sum(len(v) for v in g.values())}")
    print(f"module-level cycles (SCCs > 1 module): {len(cs)}")
    for c in cs:
        print(f"  {len(c)} modules: {' '.join(c)}")
    cs = cycles(full_graph())
    print(f"cycles counting function-level imports too: {len(cs)}")
    for c in cs:
        print(f"  {len(c)} modules: {' '.join(c)}")
    print(f"function-level imports of adapter modules: {len(lz)} statements-targets")
    stmts = {(m, ln) for m, _, ln in lz}
    print(f"function-level import statements of adapter modules: {len(stmts)}")
    if "-v" in sys.argv:
        for m, t, ln in sorted(lz):
            print(f"  {m}:{ln} -> {t}")
