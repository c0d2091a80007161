"""`option`: a config field with its help text, the one helper the dataclasses of configs/ use.

configs/ is plain data: it imports nothing of llm_recipes (llm_recipes.flags reads this metadata to
parse flags and print `--help`).
"""
from dataclasses import MISSING, field
from typing import Any


def option(default: Any = MISSING, help: str = "", *, group: str = "", default_factory: Any = MISSING,
           flag: bool = True):
    """A config field with its help text (`--help`, docs/flags.md). `flag=False`: set by the program, never by
    a flag. `group` sorts `--help` into sections."""
    metadata = {"help": help, "group": group, "flag": flag}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)
