#!/usr/bin/env python3
"""Checks that a script's install step covers the files it relies on.

Usage: check-packages.py --packages P [P ...] --files F [F ...]

Each file must belong to one of the named packages or to a package they pull
in through Depends or Pre-Depends. A package that arrives only through
Recommends (or that was installed by hand) fails the check: on a fresh
machine, where the script runs `apt-get install --no-install-recommends`, that
file would be missing. Exits 1 and names the file, its package and the fix.
"""

import argparse
import os
import re
import subprocess
import sys


def query(fields, pkg):
    r = subprocess.run(
        ["dpkg-query", "-W", "-f", fields, pkg], capture_output=True, text=True
    )
    return r.stdout if r.returncode == 0 else None


def arch_of(pkg):
    return query("${Architecture}", pkg)


def depends(pkg):
    """The installed packages `pkg` needs (Depends, Pre-Depends)."""
    out = query("${Depends}, ${Pre-Depends}", pkg) or ""
    own_arch = arch_of(pkg)
    needed = []
    for clause in out.split(","):
        clause = clause.strip()
        if not clause:
            continue
        # "a (>= 1) | b:any": the first alternative that is installed counts.
        for alt in clause.split("|"):
            name = re.sub(r"\s*\(.*?\)", "", alt).strip()
            name = re.sub(r"\s*\[.*?\]", "", name)
            name = name.split(":")[0]
            for cand in (f"{name}:{own_arch}", name):
                if query("${Status}", cand) == "install ok installed":
                    needed.append(cand)
                    break
            else:
                continue
            break
    return needed


def closure(pkgs):
    seen, todo = set(), list(pkgs)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(depends(p))
    # Compare by name and by name:arch alike.
    names = set(seen)
    for p in seen:
        a = arch_of(p)
        base = p.split(":")[0]
        names.add(base)
        if a:
            names.add(f"{base}:{a}")
    return names


def owners(path):
    """The packages that ship `path` (or the file a link points to)."""
    for candidate in (path, os.path.realpath(path)):
        r = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            if line.startswith("diversion "):
                continue
            # "pkg-a, pkg-b:arm64: /the/path"
            head = line.rsplit(": ", 1)[0]
            return [p.strip() for p in head.split(",")]
    return []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--packages", nargs="+", required=True)
    ap.add_argument("--files", nargs="+", required=True)
    args = ap.parse_args()
    have = closure(args.packages)
    bad = 0
    for f in args.files:
        if not os.path.exists(f):
            print(f"missing: {f} (no installed package provides it)", file=sys.stderr)
            bad += 1
            continue
        own = owners(f)
        if not own:
            print(f"unowned: {f} belongs to no Debian package", file=sys.stderr)
            bad += 1
            continue
        if not any(o in have or o.split(":")[0] in have for o in own):
            print(
                f"not installed by the script: {f} comes from {', '.join(own)}, "
                "which none of the named packages Depends on: add it to the script's list",
                file=sys.stderr,
            )
            bad += 1
    if bad:
        sys.exit(1)
    print(f"packages: {len(args.files)} files, each from a named package or its Depends")


if __name__ == "__main__":
    main()
