#!/usr/bin/env python3
"""Checks kt's size limits: no source file over MAX_FILE_LINES lines, no function over MAX_FUNCTION_LINES.

Long files and functions are where the cost of change hides (issue 13): a file should hold one concept and a
function one step. The limits are the issue's "~600" and "~100" lines, checked exactly.

  tools/check_sizes.py [ROOT ...]        (default: kt and tools under the repository root)

C++ functions are found by a brace scan (strings, characters and comments skipped): a brace block opened at
namespace or class level whose head ends like a function signature (``) {``, ``) const {``, a constructor's
``) : a_(x) {``, ``TEST(A, B) {``). Python functions come from the ``ast`` module (``def`` to its last line).
Prints one line per offender and exits 1 if any is not in ALLOWED.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from typing import Iterator, List, Tuple

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 100

EXTENSIONS = (".cc", ".h", ".py", ".sh")

# Files allowed over the limits, each with the reason. An entry is for a file being split: remove
# it as soon as the file is within the limits (the check then keeps it there).
ALLOWED = {}

_CONTAINER = re.compile(r"^(template\s*<.*>\s*)?(namespace|class|struct|union|enum|extern\s+\"C\")\b", re.S)
# A signature's end: ")" then qualifiers / a trailing return type, or a constructor's initializer list.
_FUNCTION_END = re.compile(r"\)\s*((const|noexcept|override|final|mutable|volatile|&|&&)\s*)*(->[^;{}]*)?$", re.S)
# A constructor's member initializer list: "Foo(int x) : a_(x), b_{x}" (ends with ")" or "}").
_CONSTRUCTOR = re.compile(r"\)\s*:\s*[\w:<>]+\s*[({].*[)}]$", re.S)
_ACCESS = re.compile(r"^((public|private|protected)\s*:\s*)+")


def _strip_cpp(text: str) -> str:
    """`text` with comments, string and character literals and preprocessor lines blanked (newlines kept)."""
    out: List[str] = []
    i, n = 0, len(text)
    line_start = True
    while i < n:
        c = text[i]
        if line_start and c == "#":
            # A preprocessor line, with its continuations.
            while i < n and not (text[i] == "\n" and text[i - 1] != "\\"):
                out.append("\n" if text[i] == "\n" else " ")
                i += 1
            continue
        if c == "\n":
            line_start = True
            out.append(c)
            i += 1
            continue
        if not c.isspace():
            line_start = False
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        elif text.startswith('R"', i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            k = text.find("(", i)
            delim = ")" + text[i + 2 : k] + '"'
            j = text.find(delim, k)
            j = n if j < 0 else j + len(delim)
            out.append('""' + "".join(ch if ch == "\n" else " " for ch in text[i + 2 : j]))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            if c == "'" and i > 0 and text[i - 1].isalnum():  # a digit separator: 1'000'000
                out.append(" ")
                i += 1
                continue
            out.append(c + " " * (min(j, n) - i - 1) + (c if j < n else ""))
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def cpp_functions(text: str) -> Iterator[Tuple[str, int, int]]:
    """(name, first line, line count) of each function body in C++ source `text`."""
    code = _strip_cpp(text)
    stack: List[str] = []  # "container", "function" or "other" per open brace
    head_start = 0
    i = 0
    fn_start_line = 0
    fn_name = ""
    for i, c in enumerate(code):
        if c in ";":
            if all(k == "container" for k in stack):
                head_start = i + 1
        elif c == "{":
            if all(k == "container" for k in stack):
                access = _ACCESS.match(code[head_start:i].lstrip())
                if access:  # "public:" and the like start no function
                    head_start = i - len(code[head_start:i].lstrip()) + access.end()
                head = code[head_start:i].strip()
                if _CONTAINER.match(head):
                    stack.append("container")
                    head_start = i + 1
                elif "(" in head and (_FUNCTION_END.search(head) or _CONSTRUCTOR.search(head)):
                    stack.append("function")
                    lead = len(code[head_start:i]) - len(code[head_start:i].lstrip())
                    fn_start_line = code.count("\n", 0, head_start + lead) + 1
                    name = re.findall(r"([~\w:]+)\s*\(", head)
                    fn_name = name[0] if name else head[:40]
                else:
                    stack.append("other")
            else:
                stack.append("nested")
        elif c == "}":
            if not stack:
                continue
            kind = stack.pop()
            if kind == "function":
                end_line = code.count("\n", 0, i) + 1
                yield fn_name, fn_start_line, end_line - fn_start_line + 1
                head_start = i + 1
            elif kind == "container":
                head_start = i + 1
            # An "other" block at container level (an initializer, a member's brace init) stays in the head.


def python_functions(text: str, path: str) -> Iterator[Tuple[str, int, int]]:
    """(qualified name, first line, line count) of each function in Python source `text`."""
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        raise SystemExit(f"{path}: cannot parse: {e}")

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                yield prefix + child.name, first, child.end_lineno - first + 1
                yield from walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")

    yield from walk(tree, "")


def source_files(roots: List[str]) -> Iterator[str]:
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            # Test data is generated, not written.
            dirnames[:] = sorted(d for d in dirnames if d != "testdata" and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(EXTENSIONS):
                    yield os.path.join(dirpath, name)


def check(path: str, rel: str) -> List[str]:
    """The offences of one file, as report lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    problems = []
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    if lines > MAX_FILE_LINES:
        problems.append(f"{rel}: {lines} lines (limit {MAX_FILE_LINES})")
    if rel.endswith((".cc", ".h")):
        functions = cpp_functions(text)
    elif rel.endswith(".py"):
        functions = python_functions(text, rel)
    else:
        functions = iter(())
    for name, line, count in functions:
        if count > MAX_FUNCTION_LINES:
            problems.append(f"{rel}:{line}: {name} is {count} lines (limit {MAX_FUNCTION_LINES})")
    return problems


# Under `bazel test` the sources come from the runfiles, one filegroup per package (tools/BUILD lists them):
# a package whose files are missing there lacks its size_checked_sources filegroup.
PACKAGES = ("kt/io", "kt/kernels", "kt/moe", "kt/python", "kt/runtime", "kt/sft", "tools")


def main(argv: List[str]) -> int:
    under_bazel = bool(os.environ.get("TEST_SRCDIR"))
    if under_bazel:
        base = os.path.join(os.environ["TEST_SRCDIR"], os.environ.get("TEST_WORKSPACE", "kt"))
    else:
        base = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    roots = argv[1:] or ["kt", "tools"]
    failed, allowed = [], []
    seen = set()
    for path in source_files([os.path.join(base, r) for r in roots]):
        rel = os.path.relpath(path, base)
        seen.update(p for p in PACKAGES if rel.startswith(p + "/"))
        for problem in check(path, rel):
            (allowed if rel in ALLOWED else failed).append(problem)
    if under_bazel and not argv[1:]:
        for p in PACKAGES:
            if p not in seen:
                failed.append(f"{p}: no source reached the test (add {p}:size_checked_sources to tools/BUILD)")
    for p in allowed:
        print(f"allowed  {p}  [{ALLOWED[p.split(':')[0]]}]")
    for p in failed:
        print(f"TOO BIG  {p}")
    stale = [f for f in ALLOWED if os.path.exists(os.path.join(base, f)) and not check(os.path.join(base, f), f)]
    for f in stale:
        print(f"note     {f} is within the limits now: remove it from ALLOWED")
    print(f"check_sizes: {len(failed)} offence(s), {len(allowed)} allowed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
