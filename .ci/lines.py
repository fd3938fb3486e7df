#!/usr/bin/env python3
"""Non-test lines of Rust sources, per file and per crate.

Usage: python3 .ci/lines.py PATH...   (a directory is read recursively for *.rs)

An item behind `#[cfg(test)]` (a `mod tests { ... }`, a `use`, a function) is left out,
and so are blank lines. Two figures a file: `lines` (every other line, doc comments
included) and `code` (also without comment-only lines). A crate's total is the sum of the
files under its `src/`.
"""
import os
import re
import sys


def strip_test_items(text):
    """The text with every item that follows a `#[cfg(test)]` attribute blanked out.

    The item ends at the `;` or the matching `}` of its first `{`, found by a scanner that
    skips strings, chars and comments. Lines are kept (blanked), so numbering holds.
    """
    out = list(text)
    i = 0
    n = len(text)
    pat = re.compile(r"#\[cfg\(test\)\]")
    while True:
        m = pat.search(text, i)
        if not m:
            break
        start = m.start()
        j = m.end()
        depth = 0
        end = None
        while j < n:
            c = text[j]
            if text.startswith("//", j):
                j = text.find("\n", j)
                j = n if j < 0 else j
                continue
            if text.startswith("/*", j):
                k = text.find("*/", j + 2)
                j = n if k < 0 else k + 2
                continue
            raw = re.match(r'r(#*)"', text[j:j + 12]) if c == "r" and (j == 0 or not (text[j - 1].isalnum() or text[j - 1] == "_")) else None
            if raw:
                close = '"' + raw.group(1)
                k = text.find(close, j + len(raw.group(0)))
                j = n if k < 0 else k + len(close)
                continue
            if c == '"':
                k = j + 1
                while k < n and text[k] != '"':
                    k += 2 if text[k] == "\\" else 1
                j = k + 1
                continue
            if c == "'":
                ch = re.match(r"'(\\.[^']*|[^\\'])'", text[j:j + 12])
                if ch:
                    j += len(ch.group(0))
                    continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    end = j + 1
                    break
            elif c == ";" and depth == 0:
                end = j + 1
                break
            j += 1
        end = n if end is None else end
        for k in range(start, end):
            if out[k] != "\n":
                out[k] = " "
        i = end
    return "".join(out)


def count(path):
    with open(path, encoding="utf-8") as f:
        text = strip_test_items(f.read())
    lines = [l.strip() for l in text.splitlines()]
    nonblank = [l for l in lines if l]
    code = [l for l in nonblank if not l.startswith("//")]
    return len(nonblank), len(code)


def files(paths):
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                if "/target" in root or "/tests" in root.replace(p, "", 1):
                    continue
                for name in sorted(names):
                    if name.endswith(".rs"):
                        yield os.path.join(root, name)
        else:
            yield p


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    totals = {}
    for path in sorted(files(argv)):
        lines, code = count(path)
        print(f"{lines:6} {code:6}  {path}")
        crate = path.split("/src/")[0] if "/src/" in path else path
        t = totals.setdefault(crate, [0, 0])
        t[0] += lines
        t[1] += code
    print("\n lines   code  crate (non-test, non-blank; code also without comments)")
    for crate, (lines, code) in sorted(totals.items()):
        print(f"{lines:6} {code:6}  {crate}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
