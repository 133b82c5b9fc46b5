"""Parses Swift files with tree-sitter-swift (pinned in tools/requirements.txt) and fails on any
syntax error: the generated bindings (ios/Sources/Acclimate/Acclimate.swift), the helpers and the
sample, which no Swift compiler on this machine can check (tools/swift_check.sh).

A file passes when its tree has no ERROR or MISSING node and declares what it must (`--expect
FILE:NAME` for each name that must appear as a declared class, struct, enum, extension, or
function), so an empty or truncated file cannot pass. Prints one line per file and
`N passed, M failed`."""

import argparse
import re
import sys

import tree_sitter
import tree_sitter_swift

# UniFFI wraps an attribute alone in a compiler conditional before each converter:
#     #if swift(>=5.8)
#     @_documentation(visibility: private)
#     #endif
#     public struct FfiConverterType… {
# Valid Swift (the attribute applies to the declaration after `#endif`), but tree-sitter-swift's
# grammar only accepts whole statements inside `#if`. These exact three lines are blanked before
# parsing (line numbers kept); anything else in the file is parsed as written.
# (also indented, inside types).
ATTRIBUTE_ONLY_IF = re.compile(rb"^#if swift\(>=5\.8\)\n[ \t]*@_documentation\(visibility: private\)\n#endif\n", re.M)

DECLS = {"class_declaration", "function_declaration", "protocol_declaration", "init_declaration", "property_declaration"}


def problems(tree, source):
    """ERROR and MISSING nodes, as `line:col: what` strings."""
    out = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            line, col = node.start_point
            text = source[node.start_byte : node.end_byte].decode("utf-8", "replace").splitlines()
            snippet = text[0][:60] if text else ""
            kind = f"missing {node.type}" if node.is_missing else "syntax error"
            out.append(f"{line + 1}:{col + 1}: {kind} near {snippet!r}")
            continue
        stack.extend(node.children)
    return out


def declared(tree, source):
    """Names declared by class/struct/enum/extension/protocol/function/property declarations."""
    names = set()
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type in DECLS:
            name = node.child_by_field_name("name")
            if name is not None:
                names.add(source[name.start_byte : name.end_byte].decode())
        stack.extend(node.children)
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--expect", action="append", default=[], metavar="FILE:NAME")
    args = ap.parse_args()
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_swift.language()))
    expect = {}
    for item in args.expect:
        path, _, name = item.rpartition(":")
        expect.setdefault(path, []).append(name)
    passed = failed = 0
    for path in args.files:
        source = open(path, "rb").read()
        source, blanked = ATTRIBUTE_ONLY_IF.subn(b"\n\n\n", source)
        tree = parser.parse(source)
        errs = problems(tree, source)
        names = declared(tree, source)
        errs += [f"declares no {n!r}" for n in expect.get(path, []) if n not in names]
        if not names:
            errs.append("declares nothing")
        if errs:
            failed += 1
            print(f"FAIL {path}")
            for e in errs[:20]:
                print(f"  {e}")
        else:
            passed += 1
            note = f", {blanked} attribute-only #if blocks blanked" if blanked else ""
            print(f"ok   {path} ({len(names)} declarations{note})")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
