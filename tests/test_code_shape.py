"""House rules on the shape of the code (read with ast, nothing imported): no function in
pipeline/ or stages/ longer than MAX_LINES lines, so every unit stays readable in one screenful or two.

`python3 tests/test_code_shape.py` prints every function over the limit (the check script)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 120
# Functions still over the limit, each to be split; remove an entry with its split (none left).
KNOWN_LONG: set[str] = set()


def long_functions(root: Path = ROOT, limit: int = MAX_LINES) -> dict[str, int]:
    """`path:qualified.name` -> lines, for every function (methods, nested ones too) over `limit`."""
    out: dict[str, int] = {}
    for pkg in ("pipeline", "stages"):
        for p in sorted((root / pkg).rglob("*.py")):
            rel = p.relative_to(root).as_posix()

            def visit(node: ast.AST, prefix: str, rel: str = rel) -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        name = f"{prefix}{child.name}"
                        if not isinstance(child, ast.ClassDef):
                            n = child.end_lineno - child.lineno + 1
                            if n > limit:
                                out[f"{rel}:{name}"] = n
                        visit(child, name + ".", rel)
                    else:
                        visit(child, prefix, rel)

            visit(ast.parse(p.read_text(), rel), "")
    return out


def test_the_check_can_fail(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(5))
    (tmp_path / "pipeline" / "m.py").write_text(f"class C:\n    def f(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n"
                                                f"def g():\n{body}\n")
    assert long_functions(tmp_path, limit=4) == {"pipeline/m.py:C.f": 6, "pipeline/m.py:g": 6}
    assert long_functions(tmp_path, limit=6) == {}


def test_no_function_over_the_limit():
    found = long_functions()
    assert set(found) - KNOWN_LONG == set(), f"functions over {MAX_LINES} lines: split them"
    assert KNOWN_LONG - set(found) == set(), "split already: remove them from KNOWN_LONG"



SUPERVISOR_MAX_LINES = 300  # issue #26: what remains of the Supervisor is supervision only


def class_lines(path: Path, name: str) -> int:
    """Lines of the top-level class `name` in `path` (its ClassDef, decorators excluded)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node.end_lineno - node.lineno + 1
    raise LookupError(f"no class {name} in {path}")


def test_class_lines_counts_the_whole_class(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("x = 1\n\nclass C:\n    a = 1\n\n    def f(self):\n        return 2\n\ny = 3\n")
    assert class_lines(p, "C") == 5


def test_the_supervisor_stays_supervision():
    """Preparation, topology, the pool, the failure policy, signals and the progress line live in
    their own modules (pipeline/run/): the Supervisor class grows back past this only by taking one in."""
    n = class_lines(ROOT / "pipeline" / "run" / "supervisor.py", "Supervisor")
    assert n <= SUPERVISOR_MAX_LINES, f"class Supervisor is {n} lines (limit {SUPERVISOR_MAX_LINES}): move a piece out"

if __name__ == "__main__":
    for name, n in sorted(long_functions().items(), key=lambda kv: -kv[1]):
        print(f"{n:5d}  {name}")


def reason_literals(root: Path = ROOT) -> dict[str, str]:
    """Every reason code written as a literal in an `ItemError(reason, ...)` or a `Failure(id, path,
    reason, ...)` in pipeline/ and stages/: code -> where."""
    out: dict[str, str] = {}
    for pkg in ("pipeline", "stages"):
        for p in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                pos = {"ItemError": 0, "Failure": 2}.get(name)
                if pos is None:
                    continue
                arg = next((k.value for k in node.keywords if k.arg == "reason"),
                           node.args[pos] if len(node.args) > pos else None)
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    out.setdefault(arg.value, f"{p.relative_to(root)}:{node.lineno}")
    return out


def test_every_reason_code_is_in_the_one_list():
    """messages.REASONS is the one list of failure reason codes (README, docs/robustness.md): a
    code raised anywhere else is a new reason nobody documented."""
    from pipeline.wire.messages import REASONS

    found = reason_literals()
    assert {"empty", "timeout", "crashed_worker"} <= set(found)  # the scan sees the decoders and the supervisor
    assert {code: where for code, where in found.items() if code not in REASONS} == {}
