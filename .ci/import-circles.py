#!/usr/bin/env python3
"""Finds import circles between the modules of each crate: an edge a -> b for every
`use crate::b...` (and `crate::b::` paths) in module a's file, and for `crate::Name`
where Name is one of the crate root's re-exports (`pub use b::Name;` in lib.rs), an
edge a -> b as well: a root re-export is an import of the module that defines it.
Reports cycles."""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else "."
crates = []
for dirpath, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in ("target", ".git", "node_modules")]
    if "Cargo.toml" in files and os.path.isdir(os.path.join(dirpath, "src")):
        crates.append(os.path.join(dirpath, "src"))
found = 0
def root_reexports(src):
    """Name -> defining top module, from the crate root's `pub use m::...` lines."""
    names = {}
    for root in ("lib.rs", "main.rs"):
        path = os.path.join(src, root)
        if not os.path.isfile(path):
            continue
        text = "\n".join(l.split("//")[0] for l in open(path).read().split("\n"))
        for m in re.finditer(r"pub\s+use\s+(?:self::|crate::)?(\w+)::([^;]*);", text):
            module, rest = m.group(1), m.group(2)
            for part in re.split(r"[{},\s]+", rest):
                part = part.strip()
                if not part or part in ("self", "*"):
                    continue
                leaf = part.split("::")[-1]
                if " as " in part:
                    leaf = part.split(" as ")[-1].strip()
                names.setdefault(leaf, module)
    return names


for src in sorted(crates):
    graph = {}
    reexports = root_reexports(src)
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, src)[:-3]
            if rel.startswith("bin" + os.sep):
                continue
            mod = rel.replace(os.sep, "::")
            if mod.endswith("::mod"):
                mod = mod[:-5]
            # a top-level module's edges: submodules count as their top module
            top = mod.split("::")[0]
            if top in ("lib", "main"):
                continue
            # code only: doc links and comments (`[`crate::x`]`) are not imports
            text = "\n".join(l.split("//")[0] for l in open(path).read().split("\n"))
            # drop #[cfg(test)] mod tests blocks roughly: everything after it
            text = re.split(r"#\[cfg\(test\)\]\s*mod\s+\w+", text)[0]
            deps = set()
            for m in re.finditer(r"\bcrate::(\w+)", text):
                deps.add(m.group(1))
            # `use crate::{a, b::c}`
            for m in re.finditer(r"use\s+crate::\{([^}]*)\}", text):
                for part in m.group(1).split(","):
                    name = part.strip().split("::")[0]
                    if name:
                        deps.add(name)
            # `crate::Name` through the root: the module that defines Name
            deps = {reexports.get(d, d) for d in deps}
            deps.discard(top)
            graph.setdefault(top, set()).update(deps)
    # cycles: DFS
    color, stack, cycles = {}, [], []
    def dfs(n):
        color[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if d not in graph:
                continue
            if color.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif color.get(d) is None:
                dfs(d)
        stack.pop()
        color[n] = 2
    for n in sorted(graph):
        if color.get(n) is None:
            dfs(n)
    for c in cycles:
        found += 1
        print(f"{os.path.relpath(src, root)}: " + " -> ".join(c))
print(f"{len(crates)} crates checked, {found} import circle(s)")
sys.exit(1 if found else 0)
