"""The package's structure: an import DAG, private Keras API only in backends/, short functions.

These read the source with `ast`; nothing is imported, so they take milliseconds.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "keras_peft"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _target(node: ast.ImportFrom | ast.Import, module: str, path: pathlib.Path) -> list[str]:
    """The keras_peft modules an import statement loads (a submodule, else its package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("keras_peft")]
    base = node.module or ""
    if node.level:  # relative: from the module's package
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        base = f"{package}.{base}" if base else package
    if not base.startswith("keras_peft"):
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _graph() -> dict[str, set[str]]:
    """Module-level imports between keras_peft modules (the facade `keras_peft` left out)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        edges = set()
        for node in tree.body:  # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(t for t in _target(node, module, path) if t != "keras_peft")
        graph[module] = edges - {module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_module_level_imports_form_a_dag():
    graph = _graph()
    assert graph["keras_peft.model"] >= {"keras_peft.policy", "keras_peft.backends"}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def _local_imports(tree) -> list[tuple[str, int]]:
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras_peft"):
                found.append((node.module, node.lineno))
            elif isinstance(node, ast.Import):
                found.extend((a.name, node.lineno) for a in node.names
                             if a.name.startswith("keras_peft"))
    return found


def test_no_function_imports_keras_peft_to_dodge_a_circle():
    found = {name: _local_imports(ast.parse(path.read_text())) for name, path in MODULES.items()}
    assert {name: hits for name, hits in found.items() if hits} == {}


def _code_lines(func, lines) -> int:
    body = func.body
    docstring = (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                 and isinstance(body[0].value.value, str))
    start = (body[0].end_lineno + 1) if docstring and len(body) > 1 else func.lineno
    if docstring and len(body) == 1:
        return 0
    return sum(1 for line in lines[start - 1:func.end_lineno]
               if line.strip() and not line.strip().startswith("#"))


def test_no_library_function_is_longer_than_60_code_lines():
    long = {}
    for name, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node, lines)
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = n
    assert long == {}


@pytest.mark.parametrize("marker", ["keras.src", "tf_keras.src", "tensorflow.python"])
def test_private_keras_modules_are_imported_only_in_backends(marker):
    outside = [name for name, path in MODULES.items()
               if not name.startswith("keras_peft.backends") and marker in path.read_text()]
    assert outside == []


def test_recipes_use_only_public_keras_peft_names():
    recipes = pathlib.Path(__file__).resolve().parents[1] / "recipes"
    private = {}
    for path in sorted(recipes.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "keras_peft" and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                private.setdefault(path.name, []).append(node.attr)
            if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras_peft")
                    and (any(part.startswith("_") for part in node.module.split("."))
                         or any(a.name.startswith("_") for a in node.names))):
                private.setdefault(path.name, []).append(node.module)
    assert private == {}


def test_both_backends_define_the_whole_interface():
    from keras_peft import backends

    for backend in (backends.keras3, backends.tf_keras):
        missing = [name for name in backends.INTERFACE if not hasattr(backend, name)]
        assert missing == [], backend.__name__
    assert {backends.keras3.NAME, backends.tf_keras.NAME} == {"keras3", "tf_keras"}
