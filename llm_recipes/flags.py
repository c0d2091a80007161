"""Command-line flags -> frozen dataclass configs: the one parser of every command of the project.

fire hands a command's entry point every `--flag value` as a keyword argument and every stray word as
a positional argument. `parse` maps them onto the command's dataclasses (its `Command.sections`) or
fails with one line naming the flag and the fix; nothing is ignored:

* an undotted flag sets a field of the first section (`--lr 1e-6` -> train_config.lr);
* `--section.field value`, or `--section_field value` (the MultiLevelOT README's spelling), sets a
  field of another section (`--distillation_config.model_name X`);
* `Command.aliases` are other names of a field (`--model_id` for `--model_name`), `Command.expand`
  flags set several fields at once (the MultiLevelOT fork's `--f 1|2`), `Command.refused` lists the
  flags of the projects we replace that we do not support, each with its reason (a value in
  `Refused.allowed` is what we always do, so it is accepted);
* values are checked and converted against the field's type hint; a field without a default is
  required.

Help comes from each field's metadata (`option(default, "meaning")`). The configs are frozen: what a
run later derives from them (what `auto` became, which tokenizer case applies) is a separate object.
"""
from __future__ import annotations

import dataclasses
import difflib
import shutil
import sys
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Optional

from configs.fields import option  # noqa: F401 (every command's configs use it: re-exported)
from llm_recipes.errors import UserError


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def is_flag(f: dataclasses.Field) -> bool:
    return f.metadata.get("flag", True)


@dataclass(frozen=True)
class Refused:
    """A flag of the projects we replace that this one does not support."""

    message: str  # why, and what to do instead (completes "--flag VALUE ...")
    allowed: tuple = ()  # values that mean what we always do (accepted, nothing to set)


@dataclass(frozen=True)
class Command:
    """One command line: its sections of flags and how the spellings of the projects we replace map onto them."""

    program: str  # how users start it, e.g. "python finetuning.py"
    summary: str  # one line for --help
    sections: dict  # section name -> dataclass; undotted flags land in the first
    aliases: dict = field(default_factory=dict)  # other flag name -> "field" or "section.field"
    refused: dict = field(default_factory=dict)  # flag -> Refused
    expand: dict = field(default_factory=dict)  # flag -> (value -> {"section.field": value}); its help in expand_help
    expand_help: dict = field(default_factory=dict)  # flag -> "VALUES: meaning", one line
    fallback: tuple = ()  # sections whose undotted field names are also accepted (llama-recipes' --fsdp_cpu_offload)
    positional: tuple = ()  # fields of the first section filled by positional arguments, in order
    groups: dict = field(default_factory=dict)  # group name -> title (--help order)
    set_by: str = "the program"  # who sets the fields that are not flags (option(flag=False))

    @property
    def main_section(self) -> str:
        return next(iter(self.sections))


@dataclass(frozen=True)
class Parsed:
    """The command's sections, built from the flags, and what the user actually passed."""

    sections: dict  # section name -> frozen dataclass instance
    given: dict  # "field" / "section.field" -> value, for every field a flag set
    spelled: dict  # the same keys -> the flag as the user wrote it ("--f 1" for an expanding flag)

    def __getitem__(self, name: str):
        return self.sections[name]


# ------------------------------------------------------------------------------------------- values
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def coerce_value(flag: str, value: Any, annotation: Any) -> Any:
    """Convert a fire-parsed value to the field's type, or raise a UserError naming the flag."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return coerce_value(flag, value, [a for a in args if a is not type(None)][0])
    if origin in (list, typing.List):
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise UserError(f"--{flag} expects a list such as a,b or [a,b], got {value!r}")
        return [coerce_value(flag, v, args[0] if args else str) for v in items]
    if annotation is bool:
        return _to_bool(flag, value)
    if annotation is int:
        return _to_number(flag, value, int, "an integer")
    if annotation is float:
        return _to_number(flag, value, float, "a number")
    if annotation is str:
        if isinstance(value, bool):
            raise UserError(f"--{flag} expects a value, e.g. --{flag} VALUE")
        if isinstance(value, (str, int, float)):
            return str(value)
        raise UserError(f"--{flag} expects a string, got {value!r}")
    return value


def _to_bool(flag: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise UserError(f"--{flag} expects true or false, got {value!r}")


def _to_number(flag: str, value: Any, kind: type, what: str):
    if isinstance(value, bool):
        raise UserError(f"--{flag} expects {what} value, got no value" if kind is int
                        else f"--{flag} expects {what}, got no value")
    if isinstance(value, int) or (kind is float and isinstance(value, float)):
        return kind(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise UserError(f"--{flag} expects {what}, got {value!r}")


# -------------------------------------------------------------------------------------------- names
def _settable(cls) -> dict:
    return {f.name: f for f in fields(cls) if is_flag(f)}


def flag_names(command: Command) -> list[str]:
    """Every flag the command accepts, as users write it."""
    names = []
    for section, cls in command.sections.items():
        prefix = "" if section == command.main_section else section + "."
        names += [prefix + name for name in _settable(cls)]
    return names + list(command.aliases) + list(command.expand)


def _unknown(command: Command, flag: str) -> UserError:
    match = difflib.get_close_matches(flag, flag_names(command), n=1, cutoff=0.6)
    hint = f"did you mean --{match[0]}?" if match else f"run `{command.program} --help` for the list"
    return UserError(f"unknown flag --{flag}: {hint}")


def _field_of(command: Command, section: str, name: str, flag: str) -> tuple[str, str]:
    cls = command.sections[section]
    if name in _settable(cls):
        return section, name
    if name in {f.name for f in fields(cls)}:
        raise UserError(f"--{flag} is set by {command.set_by}, not by a flag: remove it")
    raise _unknown(command, flag if "." in flag or section == command.main_section else f"{section}.{name}")


def canonical(command: Command, flag: str) -> str:
    """The flag's dotted spelling: aliases applied, `section_field` -> `section.field`."""
    flag = command.aliases.get(flag, flag)
    for section in command.sections:
        if section != command.main_section and flag.startswith(section + "_"):
            return f"{section}.{flag[len(section) + 1:]}"
    return flag


def resolve(command: Command, flag: str) -> tuple[str, str]:
    """A flag name -> (section, field), or a UserError naming the nearest valid flag."""
    flag = canonical(command, flag)
    if "." in flag:
        section, _, name = flag.partition(".")
        if section not in command.sections:
            raise _unknown(command, flag)
        return _field_of(command, section, name, flag)
    main = command.sections[command.main_section]
    if flag in {f.name for f in fields(main)}:
        return _field_of(command, command.main_section, flag, flag)
    for section in command.fallback:
        if flag in _settable(command.sections[section]):
            return section, flag
    raise _unknown(command, flag)


# ------------------------------------------------------------------------------------------- parsing
def raw_value(flag: str, argv: Optional[list]) -> Optional[str]:
    """A flag's value exactly as typed on the command line (fire reads "0421" as 421, "1.50" as 1.5 and
    "[a]" as a list; a string flag must keep what was typed), or None when it is not there."""
    spellings = {f"--{flag}", f"--{flag.replace('_', '-')}"}
    for n, arg in enumerate(argv or ()):
        head, eq, value = arg.partition("=")
        if head in spellings:
            return value if eq else (argv[n + 1] if n + 1 < len(argv) and not argv[n + 1].startswith("--")
                                     else None)
    return None


def _is_text(annotation) -> bool:
    return annotation is str or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                 and str in typing.get_args(annotation))


def parse(command: Command, kwargs: dict, args: tuple = (), argv: Optional[list] = None) -> Parsed:
    """The command's frozen sections from fire's positional and keyword arguments; `argv` (the command
    line, when parsing one) gives string flags their value as typed."""
    values: dict = {section: {} for section in command.sections}
    spelled: dict = {}
    if len(args) > len(command.positional):
        extra = args[len(command.positional)]
        raise UserError(f"unexpected argument {extra!r}: {command.program} takes only --flag value pairs "
                        "(a value belongs right after its flag)")
    for name, value in zip(command.positional, args):
        _set(command, values, spelled, (command.main_section, name), value, name)
    for flag, value in kwargs.items():
        flag = flag.replace("-", "_")
        if canonical(command, flag) in command.refused:
            _refuse(flag, value, command.refused[canonical(command, flag)])
            continue
        if flag in command.expand:
            for target, target_value in command.expand[flag](value).items():
                _set(command, values, spelled, resolve(command, target), target_value, f"{flag} {value}",
                     coerce=False)
            continue
        target = resolve(command, flag)
        raw = raw_value(flag, argv) if _is_text(_type_hints(command.sections[target[0]])[target[1]]) else None
        _set(command, values, spelled, target, raw if raw is not None else value, flag)
    sections = {}
    for section, cls in command.sections.items():
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                   and f.name not in values[section]]
        if missing:
            raise UserError(f"--{missing[0]} is required (run `{command.program} --help` for every flag)")
        sections[section] = cls(**values[section])
    def key(section: str, name: str) -> str:
        return name if section == command.main_section else f"{section}.{name}"

    given = {key(*target): values[target[0]][target[1]] for target in spelled}
    return Parsed(sections, given, {key(*target): f"--{flag}" for target, flag in spelled.items()})


def _set(command: Command, values: dict, spelled: dict, target: tuple[str, str], value: Any, flag: str,
         coerce: bool = True) -> None:
    section, name = target
    if coerce:
        value = coerce_value(flag, value, _type_hints(command.sections[section])[name])
    if target in spelled and values[section][name] != value:
        where = name if section == command.main_section else f"{section}.{name}"
        raise UserError(f"--{spelled[target]} and --{flag} set {where} to different values: keep one")
    values[section][name] = value
    spelled.setdefault(target, flag)


def _refuse(flag: str, value: Any, refused: Refused) -> None:
    for allowed in refused.allowed:
        try:
            if coerce_value(flag, value, type(allowed)) == allowed:
                return
        except UserError:
            pass
    shown = f"{flag} {value}" if refused.allowed and not isinstance(value, bool) else flag  # the value is refused
    raise UserError(f"--{shown} {refused.message}")


# ---------------------------------------------------------------------------------------------- help
def _default_text(f: dataclasses.Field) -> str:
    from configs.paths import REPO_ROOT

    if f.default is MISSING and f.default_factory is MISSING:
        return "(required)"
    value = f.default if f.default is not MISSING else f.default_factory()
    text = str(value)
    return text.replace(str(REPO_ROOT) + "/", "") if isinstance(value, str) else text


def _rows(command: Command):
    """(group, flag, default, help) of every flag, in section and field order."""
    for section, cls in command.sections.items():
        for f in fields(cls):
            if is_flag(f):
                flag = f"--{f.name}" if section == command.main_section else f"--{section}.{f.name}"
                group = f.metadata.get("group") or (section if len(command.sections) > 1 else "flags")
                yield group, flag, _default_text(f), help_of(f)


def help_text(command: Command, width: Optional[int] = None) -> str:
    """`--help`: a usage line, then every flag with its default and meaning, grouped, wrapped."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    lines = [f"usage: {command.program} [--flag value ...]", "", command.summary]
    rows = list(_rows(command))
    order = list(command.groups) + [g for g in dict.fromkeys(r[0] for r in rows) if g not in command.groups]
    for group in order:
        members = [r for r in rows if r[0] == group]
        if not members:
            continue
        flag_width = min(max(len(r[1]) for r in members), 30) + 2
        lines += ["", f"{command.groups.get(group, group)}:"]
        for _, flag, default, meaning in members:
            text = f"{meaning} (default: {default})" if meaning else f"(default: {default})"
            head = " " * (flag_width + 2)
            wrapped = textwrap.wrap(text, max(20, width - len(head))) or [""]
            if len(flag) + 2 > flag_width:
                lines.append(f"  {flag}")
            else:
                head = f"  {flag:<{flag_width}}"
            lines.append(head + wrapped[0])
            lines += [" " * len(head) + rest for rest in wrapped[1:]]
    for flag, meaning in command.expand_help.items():
        lines += ["", f"alias: --{flag} {meaning}"]
    if command.aliases:
        names = ", ".join(f"--{alias} = --{target}" for alias, target in command.aliases.items())
        lines += [""] + textwrap.wrap(f"other names: {names}", max(20, width), subsequent_indent="  ")
    return "\n".join(lines)


def markdown_reference(command: Command) -> str:
    """Every flag as Markdown tables, one per section (the README's flag reference)."""
    lines = []
    for section, cls in command.sections.items():
        title = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines += ["", f"### {section}", "", title, "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for f in fields(cls):
            if is_flag(f):
                flag = f"--{f.name}" if section == command.main_section else f"--{section}.{f.name}"
                lines.append(f"| `{flag}` | `{_default_text(f)}` | {help_of(f)} |")
    for flag, meaning in command.expand_help.items():
        lines += ["", f"Alias: `--{flag} {meaning}`"]
    return "\n".join(lines).lstrip("\n")


# ---------------------------------------------------------------------------------------- entry point
def repeated_flags(argv: list) -> list[str]:
    """Flags given more than once on a command line (`--lr 1 --lr 2`): fire would keep one silently."""
    seen, repeated = set(), []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0].replace("-", "_").replace(".", "_")  # the same field
            if name in seen and name not in repeated:
                repeated.append(name)
            seen.add(name)
    return repeated


def run_command(command: Command, entry: Callable[[Parsed], Any], args: tuple, kwargs: dict,
                cleanup: Optional[Callable[[], None]] = None, argv: Optional[list] = None) -> Any:
    """A fire entry point's body: --help, parsing, and UserError -> `error: <one line>`, exit code 2."""
    try:
        if kwargs.pop("help", False) or kwargs.pop("h", False):
            print(help_text(command))
            return None
        repeated = repeated_flags(argv or [])
        if repeated:
            raise UserError(f"{', '.join('--' + name for name in repeated)} given more than once; pass each flag once")
        return entry(parse(command, kwargs, args, argv))
    except UserError as error:
        from tqdm.auto import tqdm

        for line in getattr(error, "messages", [str(error)]):
            tqdm.write(f"{error.label}: {line}", file=sys.stderr)  # on its own line, below any progress bar
        sys.exit(error.exit_code)
    finally:
        if cleanup is not None:
            cleanup()


def entry_points(command: Command, run: Callable[[Parsed], Any], cleanup: Optional[Callable[[], None]] = None):
    """(main, cli) of a command: `main(*args, **kwargs)` is fire's target (tests call it directly),
    `cli()` runs fire on the process's arguments (the console scripts and `python -m ...`)."""
    def main(*args, **kwargs) -> None:
        run_command(command, run, args, kwargs, cleanup)

    def cli() -> None:
        import fire

        argv = sys.argv[1:]
        if any(arg in ("--help", "-h") for arg in argv):  # fire would describe the function instead
            print(help_text(command))
            return

        def command_line(*args, **kwargs) -> None:  # returns nothing: fire would print a returned value
            run_command(command, run, args, kwargs, cleanup, argv)

        fire.Fire(command_line)

    return main, cli
