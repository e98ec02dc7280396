#!/usr/bin/env python3
"""Writes docs/configuration.md from configs/default.toml, whose comments are
the source: one table per section (field, default, what it does), and the
commented examples as they are. `--check` fails where the doc is stale."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELD = re.compile(r"^#?\s*([a-z_][a-z0-9_]*)\s*=\s*(.+)$")


def escape(text):
    """Markdown text: angle brackets are not HTML."""
    return text.replace("<", "&lt;").replace(">", "&gt;")


def render(text):
    out = ["# Configuration", "",
           "<!-- Written by scripts/config-doc.py from configs/default.toml; edit that file. -->", ""]
    lines = text.splitlines()
    i = 0
    # The file's own introduction, up to the first section.
    intro = []
    while i < len(lines) and not lines[i].startswith("["):
        intro.append(lines[i][2:] if lines[i].startswith("# ") else lines[i].lstrip("#"))
        i += 1
    while intro and not intro[-1].strip():
        intro.pop()
    out.extend(intro + [""])
    section, rows, comment, default, prose = None, [], [], None, []

    def flush_prose():
        nonlocal prose
        body = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in prose]
        # Paragraphs: text, or example entries (from a "[[" line) as TOML.
        paras, cur = [], []
        for l in body + [""]:
            if l.strip():
                cur.append(l)
            elif cur:
                paras.append(cur)
                cur = []
        code = []
        for para in paras + [None]:
            if para is not None and para[0].startswith("[["):
                code += ([""] if code else []) + para
                continue
            if code:
                out.extend(["```toml", *code, "```", ""])
                code = []
            if para is not None:
                out.extend([escape(l) for l in para] + [""])
        prose = []

    def flush_section():
        nonlocal rows
        if section and rows:
            out.extend([f"## [{section}]", "", "| field | default | what it does |", "|---|---|---|"])
            for name, value, what in rows:
                what = escape(" ".join(what)).replace("|", "\\|")
                out.append(f"| `{name}` | `{value}` | {what} |")
            out.append("")
        rows = []

    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        if line.startswith("["):
            flush_section()
            flush_prose()
            section, comment, default = line.strip("[]"), [], None
            continue
        if not line.strip():
            if comment:
                prose.extend("# " + c for c in comment)
                prose.append("#")
                comment = []
            continue
        m = FIELD.match(line)
        if m and (not line.startswith("#") or default is not None):
            value = default if default is not None else m[2]
            rows.append((m[1], value.strip('"') if value.startswith('"') and value != '""' else value, comment))
            comment, default = [], None
            continue
        if line.startswith("# Default:"):
            default = line[len("# Default:"):].strip()
            continue
        comment.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
    flush_section()
    if comment:
        prose.extend("# " + c for c in comment)
    flush_prose()
    return "\n".join(out).rstrip() + "\n"


def main():
    doc = ROOT / "docs/configuration.md"
    text = render((ROOT / "configs/default.toml").read_text())
    if "--check" in sys.argv:
        if not doc.exists() or doc.read_text() != text:
            sys.exit("docs/configuration.md is stale: run scripts/config-doc.py")
        return
    doc.write_text(text)


if __name__ == "__main__":
    main()
