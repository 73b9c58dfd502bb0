"""Imports flow one way (../shared/DESIGN.md, "Architecture"): no cycle among the modules of metaopt/ and meta_tasks/,
and no module imports one of a later layer of :data:`LAYERS`, counting every import statement, those inside
functions too, and `from package import module` as an import of both.

The layers, first to last (a module may import its own layer and earlier ones):

0. leaves: the registry (implementations register into it), numerics, pytree helpers, the version, the machine's
   description (``metaopt.environment``);
1. the optimizer faces: the functional core and its ``torch.optim`` face (``metaopt.core``), the hand-designed
   baselines, the ``torch.compile`` helpers, the authors' third-party optimizers (``metaopt.external``);
2. hypergradient methods (``metaopt.hypergrad``);
3. learned optimizers (``metaopt.learned``; their classes read and write their own checkpoint files);
4. checkpoints: the file format and the one resolution of what names a learned optimizer (``metaopt.checkpoint``,
   which registers ``make_optimizer`` of a path or an instance), and the package's public face ``metaopt`` itself
   (``make_optimizer``, ``from_pretrained``) — the bare name ``metaopt`` stands for its ``__init__`` only;
5. tasks (``meta_tasks``): what meta-training and the evaluation train on, above every optimizer so that no update
   rule, learned rule or checkpoint depends on a task;
6. meta-training (``metaopt.meta``): the inner-loop engine (``metaopt.meta.inner``: the face loop and the vmapped
   loop that meta-training's validation, the evaluation and golden runs share), unrolls, estimators, the trainer,
   its configuration and campaigns;
7. the evaluation (``metaopt.evaluate``, its command line included: the package's ``__init__`` exports it);
8. the top: model cards and golden runs (``metaopt.cards``), the benchmark (``metaopt.bench``) and the command lines
   that drive meta-training and the evaluation together (``metaopt.meta.cli`` of ``train_meta.py``,
   ``metaopt.meta.ablation``, ``python -m metaopt.checkpoint``).

An entry names a module and every module under it; the longest entry that names a module decides its layer.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("metaopt", "meta_tasks")

LAYERS: list[list[str]] = [
    ["metaopt.registry", "metaopt.numerics", "metaopt.tree", "metaopt.version", "metaopt.environment"],
    ["metaopt.core", "metaopt.baselines", "metaopt.compiling", "metaopt.external"],
    ["metaopt.hypergrad"],
    ["metaopt.learned"],
    ["metaopt.checkpoint", "metaopt"],
    ["meta_tasks"],
    ["metaopt.meta"],
    ["metaopt.evaluate"],
    ["metaopt.cards", "metaopt.bench", "metaopt.meta.cli", "metaopt.meta.ablation", "metaopt.checkpoint.__main__"],
]
# Known imports against the layer order, (importer, imported): each would need its reason here. None are left.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its file."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str, layers: list[list[str]] = LAYERS) -> int | None:
    """The index of ``module``'s layer: that of the longest entry naming it or a package above it (the bare
    ``metaopt`` names only the package's ``__init__``); None when no entry does."""
    matches = [(len(entry), i) for i, layer in enumerate(layers) for entry in layer
               if module == entry or (entry != "metaopt" and module.startswith(entry + "."))]
    return max(matches)[1] if matches else None


def upward_edges(graph: dict[str, set[str]], layers: list[list[str]] = LAYERS) -> list[str]:
    """Every import of a module of a later layer, as ``importer (layer i) -> imported (layer j)``, sorted."""
    return sorted(f"{a} (layer {layer_of(a, layers)}) -> {b} (layer {layer_of(b, layers)})"
                  for a, targets in graph.items() for b in targets
                  if layer_of(b, layers) > layer_of(a, layers) and (a, b) not in ALLOWED_UPWARD)


def test_the_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    known = modules()
    assert "metaopt.registry" in known and "meta_tasks" in known
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert "metaopt.registry" in graph["metaopt.hypergrad.hd"]  # the detector sees the imports it should
    assert cycles(graph) == []


def test_the_layer_check_finds_an_upward_import():
    layers = [["metaopt.low", "metaopt"], ["metaopt.high", "tasks"], ["metaopt.high.cli"]]
    assert [layer_of(m, layers) for m in ("metaopt.low.x", "metaopt", "metaopt.high.cli.y", "tasks.base",
                                          "metaopt.other")] == [0, 0, 2, 1, None]
    graph = {"metaopt.low.x": {"metaopt.high"}, "metaopt.high": {"metaopt.low", "metaopt"},
             "metaopt.high.cli": {"metaopt.high"}, "metaopt": {"tasks"}}
    assert upward_edges(graph, layers) == ["metaopt (layer 0) -> tasks (layer 1)",
                                           "metaopt.low.x (layer 0) -> metaopt.high (layer 1)"]


def test_every_module_has_a_layer_and_every_entry_a_module():
    known = modules()
    assert [m for m in known if layer_of(m) is None] == []
    assert [e for layer in LAYERS for e in layer if e not in known] == []


def test_imports_follow_the_layer_order():
    """No module imports one of a later layer (at module level or inside a function); the message lists each
    offending edge."""
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert "metaopt.meta.inner" in graph["metaopt.meta.trainer"]  # validation runs the inner-loop engine
    offending = upward_edges(graph)
    assert not offending, "imports against the layer order:\n" + "\n".join(offending)


def test_heavy_optional_dependencies_load_when_used():
    """`import metaopt` loads none of Triton, matplotlib, wandb or scipy, and building an optimizer does not load the
    Triton kernels' module (torch.optim itself may import Triton through torch._dynamo)."""
    code = ("import sys, torch, metaopt; heavy = ('triton', 'matplotlib', 'wandb', 'scipy'); "
            "print(sorted(m for m in heavy if m in sys.modules)); "
            "metaopt.make_optimizer('adam-hd', [torch.zeros(2, requires_grad=True)]); "
            "print('metaopt.learned.kernels' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["[]", "False"]
