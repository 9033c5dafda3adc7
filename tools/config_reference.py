"""Print the configuration reference (every YAML key, its default and its meaning) as markdown.

    python tools/config_reference.py > /tmp/reference.md

The text comes from the config dataclasses themselves (each field's trailing comment), so the
README's reference is regenerated from the code rather than kept by hand.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.runconfig import RunConfig  # noqa: E402

_FIELD = re.compile(r"^\s+(\w+)\s*:.*?#\s*(.*)$")


def field_comments(cls: type) -> dict[str, str]:
    """Trailing `# comment` of each field line (and a comment line just above a field)."""
    comments, pending, open_field = {}, [], None
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
            continue
        match = _FIELD.match(line)
        name = re.match(r"^\s+(\w+)\s*:", line)
        if match:
            comments[match.group(1)] = match.group(2)
        elif name and pending:
            comments[name.group(1)] = " ".join(pending)
        elif open_field and "#" in line:  # a field whose type spans lines: comment at its end
            comments[open_field] = line.split("#", 1)[1].strip()
        open_field = name.group(1) if name and name.group(1) not in comments else None
        pending = []
    return comments


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default) if field.default != () else "[]"
    return ""


def rows(cls: type, prefix: str) -> list[str]:
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}"
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            out += rows(hint, key)
            continue
        text = comments.get(field.name, "").replace("|", "\\|")
        out.append(f"| `{key}` | `{_default(field)}` | {text} |")
        nested = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
        if nested:  # an optional section (`moe: MoEConfig | None`): its keys when it is set
            out += rows(nested[0], key)
    return out


def main() -> int:
    print("| key | default | meaning |\n|---|---|---|")
    for section in dataclasses.fields(RunConfig):
        for row in rows(typing.get_type_hints(RunConfig)[section.name], section.name):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
