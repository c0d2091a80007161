"""Which student parameters train: --freeze_layers, --freeze_regex, --unfreeze_regex, --spectrum_yaml.

A parameter trains when all of these hold:
- with unfreeze patterns (--unfreeze_regex, and the `unfrozen_parameters` list of a Spectrum YAML),
  its name matches one of them;
- its name matches no --freeze_regex pattern;
- with --freeze_layers, it is not in the first --num_freeze_layers transformer blocks.
So freezing always wins over unfreezing, and the flags combine. --freeze_regex / --unfreeze_regex use
re.search (a pattern may match anywhere in the name); Spectrum entries use re.match (anchored at the
start of the name), as Spectrum, DistillKit and Axolotl apply them. Names are those of
`model.named_parameters()`; a tensor shared under several names (tied embeddings) trains only if no
name freezes it and, with unfreeze patterns, one of its names matches. A pattern that matches no
parameter is an error: a typo, or a Spectrum file written for another model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from llm_recipes.errors import UserError


def load_spectrum_yaml(path: str) -> list[str]:
    """The `unfrozen_parameters` list of a Spectrum YAML file."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--spectrum_yaml {path} does not exist: pass the YAML file Spectrum wrote")
    try:
        content = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"--spectrum_yaml {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    entries = content.get("unfrozen_parameters") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise UserError(f"--spectrum_yaml {path} has no `unfrozen_parameters:` list of parameter names: pass a "
                        "Spectrum output file")
    return entries


def _compile(patterns: list[str], flag: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise UserError(f"{flag} pattern {pattern!r} is not a valid regular expression: {error}") from None
    return compiled


def _check_all_match(patterns: list[re.Pattern], names: list[str], how: Callable, flag: str) -> None:
    for pattern in patterns:
        if not any(how(pattern, name) for name in names):
            raise UserError(f"{flag} pattern {pattern.pattern!r} matches no parameter of the student (names look like "
                            f"{names[0]!r}, {names[-1]!r}): fix the pattern")


def apply_freezing(model: nn.Module, freeze_regex: Optional[list[str]] = None,
                   unfreeze_regex: Optional[list[str]] = None, spectrum_yaml: Optional[str] = None) -> None:
    """Set requires_grad=False on every parameter the flags freeze (see the module docstring)."""
    freeze = _compile(freeze_regex or [], "--freeze_regex")
    unfreeze = _compile(unfreeze_regex or [], "--unfreeze_regex")
    spectrum = _compile(load_spectrum_yaml(spectrum_yaml), f"--spectrum_yaml {spectrum_yaml}") if spectrum_yaml else []
    if not (freeze or unfreeze or spectrum):
        return
    named = list(model.named_parameters(remove_duplicate=False))
    names = [name for name, _ in named]
    search, match = (lambda p, n: p.search(n) is not None), (lambda p, n: p.match(n) is not None)
    _check_all_match(freeze, names, search, "--freeze_regex")
    _check_all_match(unfreeze, names, search, "--unfreeze_regex")
    _check_all_match(spectrum, names, match, "--spectrum_yaml")

    frozen, unfrozen = set(), set()
    for name, param in named:
        if any(search(p, name) for p in freeze):
            frozen.add(id(param))
        if any(search(p, name) for p in unfreeze) or any(match(p, name) for p in spectrum):
            unfrozen.add(id(param))
    restrict = bool(unfreeze or spectrum)
    for _, param in named:
        if id(param) in frozen or (restrict and id(param) not in unfrozen):
            param.requires_grad_(False)
