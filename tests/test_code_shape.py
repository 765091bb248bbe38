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


if __name__ == "__main__":
    for name, n in sorted(long_functions().items(), key=lambda kv: -kv[1]):
        print(f"{n:5d}  {name}")
