"""Sections of docs/BENCHMARKS.md that a run of their own writes (``python3 -m bench
fairness``…), between ``<!-- section:NAME -->`` and ``<!-- /section:NAME -->``: each
run replaces its own section, and the main run keeps them when it rewrites the file."""

from __future__ import annotations

import re
from pathlib import Path


def _section(name: str, closing: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- section:{name} -->\n.*?<!-- /section:{closing} -->\n", re.S)


_ANY = _section(r"(?P<name>[\w-]+)", "(?P=name)")


def wrap(name: str, text: str) -> str:
    return f"<!-- section:{name} -->\n{text.rstrip()}\n<!-- /section:{name} -->\n"


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` in the file as section ``name``: in place of the old one, or at the end."""
    block = wrap(name, text)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    new, replaced = _section(re.escape(name), re.escape(name)).subn(lambda _: block, old, count=1)
    path.write_text(new if replaced else old.rstrip() + "\n\n" + block)


def kept_sections(path: Path, text: str) -> str:
    """``text`` with the sections the file at ``path`` holds appended, as they were."""
    old = path.read_text() if path.exists() else ""
    blocks = [m.group(0) for m in _ANY.finditer(old)]
    return text.rstrip() + "\n" + "".join("\n" + block for block in blocks)
