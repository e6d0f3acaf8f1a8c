"""Each stage imports only the layers below it: errors -> rundir -> evaluation -> metadata -> cnn -> fusion -> ensemble -> triage -> cli.py."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("errors", "rundir", "evaluation", "metadata", "cnn", "fusion", "ensemble", "triage")


def first_party_imports(path: Path) -> set[str]:
    """Top-level packages of this project that a module imports, anywhere in it (function-local imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in LAYERS}
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_itself_and_the_layers_below(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    upward = {
        str(path.relative_to(ROOT)): sorted(first_party_imports(path) - allowed)
        for path in sorted((ROOT / layer).rglob("*.py"))
        if first_party_imports(path) - allowed
    }
    assert not upward, f"imports that point up the layers {' -> '.join(LAYERS)}: {upward}"


def test_the_checker_sees_function_local_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ensemble.report import write_report\n    import fusion.stage\n")
    assert first_party_imports(module) == {"ensemble", "fusion"}


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_60_lines() -> None:
    """Long functions hide steps that deserve names (a 127-line train_fold once did seeding, caching, three
    datasets, compile, resume, fit, TTA and four artifacts)."""
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in [ROOT / "cli.py", *sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


MAX_POSITIONAL = 4
FRAMEWORK_HOOKS = {"settings_customise_sources"}  # signatures a library dictates and calls positionally


def _package_functions() -> list[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef]]:
    return [
        (path, node)
        for path in [ROOT / "cli.py", *sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def test_no_signature_takes_five_or_more_positional_parameters() -> None:
    """Past four, a call site cannot be read without the signature beside it (`train_pair(m, f, t, t2, c, ...)`):
    the rest are keyword-only (`*`). `self`/`cls` do not count; CLI commands are called by name by typer."""
    crowded = []
    for path, node in _package_functions():
        positional = [a.arg for a in (*node.args.posonlyargs, *node.args.args) if a.arg not in ("self", "cls")]
        if len(positional) > MAX_POSITIONAL and path.name != "cli.py" and node.name not in FRAMEWORK_HOOKS:
            crowded.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({', '.join(positional)})")
    assert not crowded, f"signatures with more than {MAX_POSITIONAL} positional parameters (make the rest keyword-only): {crowded}"


def test_no_library_function_looks_like_a_test() -> None:
    """pytest collects any `test*` function a test module imports: a library function must not be named like one."""
    named_like_tests = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}" for path, node in _package_functions() if node.name.startswith("test")]
    assert not named_like_tests, named_like_tests
