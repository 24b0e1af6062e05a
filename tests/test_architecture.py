"""The package layout: a one-way import graph (study -> run -> agent -> models; data and envs beside
them), no cycles (deferred imports included), no heavy imports for the agent or the CLI, and
classes and modules small enough to read."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dreamer_tf"

# Rank of each layer: a module may import modules of its own layer, of lower ranks, and the
# modules standing beside every layer. Entry points (rank 5) may import anything.
RANK = {"models": 1, "agent": 2, "run": 3, "study": 4}
BESIDE = {"data", "envs"}          # stand beside the layers: import only the base modules and themselves
BASE = {"config", "utils"}         # import nothing of the package but each other
ENTRY = {"cli", "train", "__main__", "__init__"}


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, name: str) -> set[str]:
    """Every dreamer_tf module `path` imports, at any depth (functions included)."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test).endswith("TYPE_CHECKING") for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dreamer_tf")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = name.split(".")[: -node.level] if not path.name == "__init__.py" else \
                    name.split(".")[: len(name.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.startswith("dreamer_tf"):  # `from package import module` imports the module
                known = modules()
                names = [f"{base}.{a.name}" for a in node.names]
                found |= {n for n in names if n in known or f"{n}.__init__" in known}
                if any(n not in known and f"{n}.__init__" not in known for n in names):
                    found.add(base)
    known = modules()
    out = set()
    for target in sorted(found):  # resolve `from pkg import module` and `from module import name`
        while target and target not in known and f"{target}.__init__" not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target.removesuffix(".__init__"))
    # A module's own parent packages are always imported before it: not an edge.
    parents = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
    return {t for t in out if t != name.removesuffix(".__init__") and t not in parents}


def group(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def allowed(source: str, target: str) -> bool:
    s, t = group(source), group(target)
    if s in ENTRY or t in BASE or s == t:
        return True
    if s in BASE or s in BESIDE:
        return False
    if t in BESIDE:
        return True
    return RANK.get(t, 99) < RANK[s]


def graph() -> dict[str, set[str]]:
    return {name.removesuffix(".__init__"): imports(path, name) for name, path in modules().items()}


def test_imports_run_one_way():
    wrong = [f"{s} imports {t}" for s, targets in graph().items() for t in sorted(targets)
             if t.startswith("dreamer_tf") and t != "dreamer_tf" and not allowed(s, t)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt == "dreamer_tf":
                continue
            if state.get(nxt) == 1:
                return stack + [node, nxt]
            if state.get(nxt) is None and (cycle := visit(nxt, stack + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(edges):
        if state.get(node) is None and (cycle := visit(node, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_checker_sees_a_wrong_import(tmp_path):
    """The rules above can fail: an upward import and a deferred one are both caught."""
    assert not allowed("dreamer_tf.models.rssm", "dreamer_tf.agent.dreamer")
    assert not allowed("dreamer_tf.agent.dreamer", "dreamer_tf.run.loop")
    assert not allowed("dreamer_tf.data.replay", "dreamer_tf.agent.dreamer")
    assert not allowed("dreamer_tf.envs.dmc", "dreamer_tf.run.collect")
    assert allowed("dreamer_tf.study.bench", "dreamer_tf.agent")
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from dreamer_tf.run import loop\n")
    assert imports(module, "dreamer_tf.agent.m") == {"dreamer_tf.run.loop"}


def test_only_the_study_tools_import_matplotlib_or_ray():
    heavy = []
    for name, path in modules().items():
        if group(name) == "study":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            heavy += [f"{name} imports {n}" for n in names if n.split(".")[0] in ("matplotlib", "ray")]
    assert not heavy, "\n".join(heavy)


# Keras 3 imports matplotlib itself when it is installed, so `dreamer_tf.agent` is checked by the
# static test above; the CLI and the loop import neither TensorFlow nor Keras at import time.
@pytest.mark.parametrize("module", ["dreamer_tf.cli", "dreamer_tf.run.loop"])
def test_cli_and_loop_load_neither_matplotlib_nor_ray(module):
    code = f"import sys, {module}; print(sorted(m for m in ('matplotlib', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def _class_lengths(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]


def test_classes_and_modules_are_small():
    too_long = []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        if lines > 500:
            too_long.append(f"module {name}: {lines} lines")
        too_long += [f"class {name}.{cls}: {n} lines" for cls, n in _class_lengths(path) if n > 250]
    assert not too_long, "\n".join(too_long)
