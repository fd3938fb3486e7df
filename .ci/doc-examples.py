#!/usr/bin/env python3
"""Prints how many of a crate's public functions have a doc example (a ``` block in the
doc comment right above them). Public: `pub fn` / `pub async fn` / `pub const fn` (not
`pub(crate)`), outside `#[cfg(test)]` modules and trait impls (a trait method's docs are
the trait's). Usage: .ci/doc-examples.py [src dir, default core/src] [--min PERCENT]"""
import os, re, sys

args = [a for a in sys.argv[1:]]
minimum = None
if "--min" in args:
    at = args.index("--min")
    minimum = float(args[at + 1])
    del args[at:at + 2]
src = args[0] if args else "core/src"
with_example, without = 0, []
FN = re.compile(r"^\s*pub\s+(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?fn\s+(\w+)")
for dirpath, _, files in os.walk(src):
    for name in sorted(files):
        if not name.endswith(".rs"):
            continue
        path = os.path.join(dirpath, name)
        lines = open(path).read().split("\n")
        doc, in_trait_impl, depth_at_impl, depth = [], False, 0, 0
        for line in lines:
            stripped = line.strip()
            if re.match(r"#\[cfg\(test\)\]", stripped):
                break
            if re.match(r"^impl\b.*\bfor\b", stripped) and not in_trait_impl:
                in_trait_impl, depth_at_impl = True, depth
            if stripped.startswith("///"):
                doc.append(stripped)
            elif stripped.startswith("#[") or stripped == "":
                pass
            else:
                m = FN.match(line)
                if m and not in_trait_impl:
                    if any(d.startswith("/// ```") for d in doc):
                        with_example += 1
                    else:
                        without.append(f"{path}: {m.group(1)}")
                doc = []
            depth += line.count("{") - line.count("}")
            if in_trait_impl and depth <= depth_at_impl and "}" in line:
                in_trait_impl = False
total = with_example + len(without)
ratio = 100.0 * with_example / total if total else 100.0
print(f"{src}: {with_example} of {total} public functions have a doc example ({ratio:.0f} %)")
if "-v" in sys.argv or os.environ.get("DOC_EXAMPLES_VERBOSE"):
    for item in without:
        print("  without:", item)
if minimum is not None and ratio < minimum:
    sys.exit(f"below the {minimum:.0f} % the project asks for")
