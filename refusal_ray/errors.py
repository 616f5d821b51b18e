"""Errors that the CLI turns into one line and exit code 2."""

from __future__ import annotations


class SpecError(Exception):
    """Bad input: a spec, a path or a flag. Rendered as '<file>: <field>: <problem>'."""

    def __init__(self, file: str, field: str, problem: str):
        self.file, self.field, self.problem = file, field, problem
        super().__init__(f"{file}: {field}: {problem}" if field else f"{file}: {problem}")
