#!/usr/bin/env python3
"""Fails when the crate's module graph has a cycle.

Every module (`src/lib.rs` and the files its `mod` declarations name, tests left out) is a node;
module A depends on module B when A's code names anything in B: a `use` tree, or a path written
inline (`crate::a::b::f()`, `super::x::T`, `self::y`, or `child::item` for a child module). A
path resolves to the longest module prefix it names. A strongly connected component of more than
one module is a cycle; each is printed with the edges that close it.

Why not `cargo modules dependencies --acyclic`: it checks the item graph, where a type and its
own method already form a cycle, and its `uses` edges come from `use` items only, so a path
written inline (how the bridge/ingest loop of the old tree was tied) goes unseen. `cargo modules
dependencies` still draws the graph well.

Usage: deploy/local/acyclic.py [crate root, default .]
       deploy/local/acyclic.py --self-test   (proves the check fails on a loop written inline)
"""
import os
import re
import subprocess
import sys
import tempfile

if sys.argv[1:] == ["--self-test"]:
    with tempfile.TemporaryDirectory() as crate:
        os.makedirs(os.path.join(crate, "src", "a"))
        files = {
            "lib.rs": "pub mod a;\npub mod b;\n",
            "a/mod.rs": "pub mod x;\n",
            "a/x.rs": "pub fn f() { crate::b::g() }\n",
            "b.rs": "use super::a::x; // a comment naming crate::nothing\npub fn g() {}\npub fn h() { x::f() }\n",
        }
        for name, text in files.items():
            with open(os.path.join(crate, "src", name), "w") as out:
                out.write(text)
        looped = subprocess.run([sys.executable, __file__, crate], capture_output=True, text=True)
        os.remove(os.path.join(crate, "src", "b.rs"))
        with open(os.path.join(crate, "src", "b.rs"), "w") as out:
            out.write("pub fn g() {}\n")
        clean = subprocess.run([sys.executable, __file__, crate], capture_output=True, text=True)
    if looped.returncode != 1 or "crate::a::x -> crate::b" not in looped.stdout or clean.returncode != 0:
        print("acyclic self-test FAILED:", looped.stdout, clean.stdout)
        sys.exit(2)
    print("acyclic self-test: a loop is found, a tree passes")
    sys.exit(0)

root = sys.argv[1] if len(sys.argv) > 1 else "."
src = os.path.join(root, "src")


def strip(text):
    """Removes comments, string and char literals, and `#[cfg(test)]` items."""
    text = re.sub(r'//[^\n]*', '', text)
    text = re.sub(r'/\*.*?\*/', '', text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    text = re.sub(r"'(?:\\.|[^'\\])'", "' '", text)
    # `#[cfg(test)] mod tests;` and `#[cfg(test)] mod tests { ... }`
    out, i = [], 0
    for m in re.finditer(r'#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+\w+\s*([;{])', text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        if m.group(1) == ';':
            i = m.end()
            continue
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {'{': 1, '}': -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return ''.join(out)


def module_file(module_dir, name):
    for candidate in (os.path.join(module_dir, name + ".rs"), os.path.join(module_dir, name, "mod.rs")):
        if os.path.exists(candidate):
            return candidate
    return None


modules = {}  # path -> stripped code


def load(path, file):
    code = strip(open(file).read())
    modules[path] = code
    base = os.path.basename(file)
    module_dir = os.path.dirname(file) if base in ("lib.rs", "mod.rs") else os.path.splitext(file)[0]
    for m in re.finditer(r'(?:pub(?:\([a-z]+\))?\s+)?mod\s+(\w+)\s*;', code):
        child = module_file(module_dir, m.group(1))
        if child:
            load(path + "::" + m.group(1), child)


load("crate", os.path.join(src, "lib.rs"))


def expand_use_tree(tree):
    """`a::{b, c::{d, e}}` -> [`a::b`, `a::c::d`, `a::c::e`]."""
    tree = re.sub(r'\s+', '', tree)
    m = re.match(r'^(.*?)\{(.*)\}$', tree)
    if not m:
        return [re.sub(r'as\w+$', '', tree)]
    prefix, inner = m.group(1), m.group(2)
    parts, depth, current = [], 0, ''
    for ch in inner:
        if ch == ',' and depth == 0:
            parts.append(current)
            current = ''
            continue
        depth += {'{': 1, '}': -1}.get(ch, 0)
        current += ch
    parts.append(current)
    return [p for part in parts if part for p in expand_use_tree(prefix + part)]


def resolve(current, path):
    segments = [s for s in path.split('::') if s]
    if not segments:
        return None
    head = segments[0]
    if head == 'crate':
        base, rest = 'crate', segments[1:]
    elif head == 'super' or head == 'self':
        base = current
        while segments and segments[0] in ('super', 'self'):
            if segments[0] == 'super':
                base = base.rsplit('::', 1)[0]
            segments = segments[1:]
        rest = segments
    elif current + '::' + head in modules:
        base, rest = current, segments
    else:
        return None  # an extern crate, std, or a name brought in by a `use`
    target = base
    for segment in rest:
        if target + '::' + segment in modules:
            target = target + '::' + segment
        else:
            break
    return target


edges = {m: set() for m in modules}
for module, code in modules.items():
    paths = []
    for m in re.finditer(r'\buse\s+([^;]+);', code):
        paths.extend(expand_use_tree(m.group(1)))
    body = re.sub(r'\buse\s+[^;]+;', '', code)
    paths.extend(m.group(0) for m in re.finditer(r'\b(?:crate|super|self|[a-z_][a-z0-9_]*)(?:::[A-Za-z_][A-Za-z0-9_]*)+', body))
    for path in paths:
        target = resolve(module, path)
        if target and target != module:
            edges[module].add(target)

index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges[v]):
        if w not in index:
            strong(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        component = []
        while True:
            w = stack.pop()
            on.discard(w)
            component.append(w)
            if w == v:
                break
        if len(component) > 1:
            sccs.append(sorted(component))


for v in sorted(edges):
    if v not in index:
        strong(v)
print(f"module graph: {len(modules)} modules, {sum(len(s) for s in edges.values())} dependencies, {len(sccs)} cycle(s)")
for component in sccs:
    print("  cycle among: " + ", ".join(component))
    for a in component:
        for b in sorted(edges[a] & set(component)):
            print(f"    {a} -> {b}")
sys.exit(1 if sccs else 0)
