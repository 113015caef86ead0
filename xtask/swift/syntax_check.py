"""Parses Swift files with tree-sitter-swift and reports every syntax error (ERROR or MISSING node).

tree-sitter-swift cannot parse `#if` blocks that wrap only an attribute (UniFFI's generated code has
`#if swift(>=5.8) @_documentation(…) #endif` before declarations), so `#if swift(>=X)` conditions are resolved
first, as a Swift 5.8+ compiler would: the directive lines become blank lines (line numbers stay right) and
`#else` branches of such blocks are blanked out. Other directives are left to the parser. The grammar also lacks the empty-tuple expression `()`, which the
generated code uses once as `{ () }` (a closure returning Void); that exact text is read as the equivalent `{ }`.

Usage: python3 syntax_check.py FILE.swift ...   Exit status 1 if any file has an error.
"""
import re
import sys

SWIFT_VERSION_IF = re.compile(r"^\s*#if\s+swift\(\s*>=\s*[0-9.]+\s*\)\s*$")


def resolve_swift_version_ifs(source: str) -> str:
    out, stack = [], []  # stack entries: "version" (true branch), "version-else" (dropped), or "other"
    for line in source.split("\n"):
        stripped = line.strip()
        if SWIFT_VERSION_IF.match(line):
            stack.append("version")
            out.append("")
        elif stripped.startswith("#if"):
            stack.append("other")
            out.append(line)
        elif stripped.startswith("#else") and stack and stack[-1].startswith("version"):
            stack[-1] = "version-else"
            out.append("")
        elif stripped.startswith("#endif") and stack:
            out.append("" if stack.pop().startswith("version") else line)
        else:
            out.append("" if "version-else" in stack else line)
    return "\n".join(out).replace("{ () }", "{ }")

import tree_sitter_swift
from tree_sitter import Language, Parser


def problems(node, out):
    if node.type == "ERROR" or node.is_missing:
        row, col = node.start_point
        out.append(f"{row + 1}:{col + 1}: {'missing ' + node.type if node.is_missing else 'syntax error'}")
    for child in node.children:
        problems(child, out)


def main(paths):
    parser = Parser(Language(tree_sitter_swift.language()))
    bad = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = parser.parse(resolve_swift_version_ifs(f.read()).encode("utf-8"))
        found = []
        problems(tree.root_node, found)
        for p in found[:20]:
            print(f"{path}:{p}")
        bad += bool(found)
        print(f"{'ok' if not found else 'ERRORS'}  {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
