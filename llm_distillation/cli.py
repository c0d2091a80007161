"""Strict flags for the task-side entry points (generate, benchmark): a dataclass per command.

fire hands `main(**kwargs)` every `--flag value`; `parse_flags` maps them onto the command's dataclass
with the trainer's type checks (llm_recipes.config), so a misspelled or unknown flag is a one-line
error with the nearest valid name instead of being ignored. `aliases` accept the flag names of the
published scripts (e.g. `--model_id`); `retired` names flags of those scripts that have no meaning
here, with the reason.
"""
from __future__ import annotations

import difflib
import sys
import typing
from dataclasses import MISSING, fields
from typing import Callable

from llm_recipes.config import coerce_value
from llm_recipes.config import field_comments
from llm_recipes.errors import UserError


def parse_flags(cls, kwargs: dict, *, program: str, aliases: dict[str, str] | None = None,
                retired: dict[str, str] | None = None):
    """An instance of `cls` from fire's keyword arguments, or a UserError naming the bad flag."""
    aliases, retired = aliases or {}, retired or {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    values, spelled = {}, {}
    for flag, value in kwargs.items():
        name = flag.replace("-", "_")
        if name in retired:
            raise UserError(f"--{flag} {retired[name]}")
        name = aliases.get(name, name)
        if name not in names:
            match = difflib.get_close_matches(name, names + list(aliases), n=1, cutoff=0.6)
            hint = f"did you mean --{match[0]}?" if match else f"run `python -m {program} --help` for the list"
            raise UserError(f"unknown flag --{flag}: {hint}")
        coerced = coerce_value(flag, value, hints[name])
        if name in values and values[name] != coerced:
            raise UserError(f"--{spelled[name]} and --{flag} set {name} to different values: keep one")
        values[name], spelled[name] = coerced, flag
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in values]
    if missing:
        raise UserError(f"--{missing[0]} is required (run `python -m {program} --help` for every flag)")
    return cls(**values)


def usage(cls, program: str, summary: str) -> str:
    """Every flag with its default and the comment written after its field."""
    comments = field_comments(cls)
    lines = [f"python -m {program} --flag value ...", "", summary, ""]
    for f in fields(cls):
        default = "(required)" if f.default is MISSING else str(f.default)
        lines.append(f"  --{f.name:<22} {default:<12} {comments.get(f.name, '')}")
    return "\n".join(lines)


def run_command(run: Callable, cls, kwargs: dict, *, program: str, summary: str, aliases=None, retired=None):
    """fire entry point body: --help, flag parsing, and UserError -> one line on stderr, exit code 2."""
    if kwargs.pop("help", False) or kwargs.pop("h", False):
        print(usage(cls, program, summary))
        return None
    try:
        return run(parse_flags(cls, kwargs, program=program, aliases=aliases, retired=retired))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
