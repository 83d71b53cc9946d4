"""STYLE.md's mechanical checks, enforced so that they stay true."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [ROOT / "samkv_integrations", ROOT / "llamaindex", ROOT / "langchain"]
METHODS_DIR = ROOT / "samkv_integrations" / "methods"


def _sources(*roots: Path) -> list[Path]:
    return [p for root in roots for p in sorted(root.rglob("*.py"))]


def test_engine_and_adapters_never_ask_which_method_runs() -> None:
    pattern = re.compile(r"isinstance\(.*Method")
    roots = [ROOT / "samkv_integrations" / "engine.py", ROOT / "llamaindex", ROOT / "langchain"]
    offenders = [
        f"{path}:{n}"
        for root in roots
        for path in ([root] if root.is_file() else _sources(root))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_library_code_has_no_bare_asserts_and_never_unpickles() -> None:
    forbidden = re.compile(r"^\s*assert |pickle\.load|torch\.load\(|weights_only\s*=\s*False")
    offenders = [
        f"{path}:{n}: {line.strip()}"
        for path in _sources(*LIBRARY)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if forbidden.search(line)
    ]
    assert offenders == []


def test_each_method_is_one_small_file_with_one_method_class() -> None:
    # methods/ also holds the machinery methods share (recompute, block scoring, specs):
    # the rule binds the files that define a registered method.
    import inspect

    from samkv_integrations.methods import METHODS

    for name, cls in METHODS.items():
        path = Path(inspect.getfile(cls))
        assert path.parent == METHODS_DIR, f"{name} is defined outside methods/"
        text = path.read_text()
        assert len(re.findall(r"^class \w*Method\b", text, re.M)) == 1, path.name
        assert len(text.splitlines()) <= 200, f"{path.name} has {len(text.splitlines())} lines"


def test_every_method_has_a_contract_test() -> None:
    from samkv_integrations.methods import METHODS

    tests_dir = ROOT / "tests" / "methods"
    for name, cls in METHODS.items():
        test_file = tests_dir / f"test_{name}.py"
        assert test_file.is_file(), f"no contract test for method {name!r}"
        text = test_file.read_text()
        assert re.search(r"class \w+\(MethodContract\)", text), test_file.name
        assert cls.__name__ in text, f"{test_file.name} does not test {cls.__name__}"


_PROBE = r"""
import json, sys
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from samkv_integrations.models.shapes import random_model

def snapshot(model):
    layers = model.get_decoder().layers
    return {
        "attention": sorted(ALL_ATTENTION_FUNCTIONS.keys()),
        "hooks": [len(l.self_attn._forward_hooks) + len(l.self_attn.q_proj._forward_hooks)
                  + len(l._forward_hooks) + len(l._forward_pre_hooks) for l in layers],
    }

states = {}
loaded = random_model("tiny-llama", device="cpu")
states["before"] = snapshot(loaded.model)
import samkv_integrations
from samkv_integrations import KVCacheStore, SamKVEngine
from samkv_integrations.methods import METHODS
states["imported"] = snapshot(loaded.model)
engine = SamKVEngine(loaded, KVCacheStore("memory://style"))
refs = engine.index(["one document about cats " * 20, "another about dogs " * 20], progress=False)
for name in METHODS:
    engine.answer("cats?", refs, method=name, max_new_tokens=2)
states["after_methods"] = snapshot(loaded.model)
try:
    engine.answer("cats?", refs, method="full", max_new_tokens=10**9)
except ValueError:
    pass
class Boom(RuntimeError):
    pass
layer = loaded.model.get_decoder().layers[-1]
original = layer.mlp.forward
def explode(*args, **kwargs):
    raise Boom()
layer.mlp.forward = explode
for name in METHODS:
    try:
        engine.answer("cats?", refs, method=name, max_new_tokens=2)
    except Boom:
        pass
layer.mlp.forward = original
try:
    engine.index(["a fresh document that must be encoded"], progress=False)
except Boom:
    pass
states["after_errors"] = snapshot(loaded.model)
print(json.dumps(states))
"""


def test_hooks_and_attention_functions_are_scoped() -> None:
    """Importing the package and running every method (also failing runs) leaves the model as it was."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, cwd=ROOT
    )
    states = json.loads(out.stdout.strip().splitlines()[-1])
    assert (
        states["before"] == states["imported"] == states["after_methods"] == states["after_errors"]
    )


def _module_imports(path: Path) -> set[str]:
    """First-party modules ``path`` imports at module level (TYPE_CHECKING blocks excluded)."""
    import ast

    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else []:
            if isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                names.add(sub.module)
                names.update(f"{sub.module}.{a.name}" for a in sub.names)
            elif isinstance(sub, ast.Import):
                names.update(a.name for a in sub.names)
    return {n for n in names if n.startswith("samkv_integrations")}


def test_core_import_graph_has_no_circle_and_no_upward_import() -> None:
    core = ROOT / "samkv_integrations"
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in core.rglob("*.py")
    }
    graph = {
        name: {m for m in _module_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    upward = [
        f"{path}:{n}"
        for path in modules.values()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*(from|import) (llama_index|langchain|samkv_chroma_demo)\b", line)
    ]
    assert upward == []
    # A package's __init__ re-exports its modules; a cycle through it is not one of concepts.
    graph = {
        k: {m for m in v if m not in modules or modules[m].name != "__init__.py"}
        for k, v in graph.items()
    }
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
