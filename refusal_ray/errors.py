"""Errors that the CLI turns into one line and exit code 2."""

from __future__ import annotations


def describe(e: BaseException) -> str:
    """An exception as one line for a stored error: its type and the first non-empty line of its message
    (terminal colour codes, which Ray puts around actor names, removed)."""
    import re

    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    return type(e).__name__ + (f": {lines[0]}" if lines else "")


class SpecError(Exception):
    """Bad input: a spec, a path or a flag. Rendered as '<file>: <field>: <problem>'."""

    def __init__(self, file: str, field: str, problem: str):
        self.file, self.field, self.problem = file, field, problem
        super().__init__(f"{file}: {field}: {problem}" if field else f"{file}: {problem}")
