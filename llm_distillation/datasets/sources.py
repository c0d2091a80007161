"""Where raw examples come from: a Hub id, a `save_to_disk` folder, a data file, or a folder of split files.

One function answers "give me split S of source X" for every kind of source, so a task loader never
cares whether it runs on a GPU node with the Hub or on a machine with a local copy. Nothing here
assumes a home directory: relative paths are relative to the current directory.

Split names of files: `train.jsonl`, `validation.json`, `test.csv`... (a folder holds one file per
split; also `.parquet`). A single file, or a single saved Dataset, is the split its name says when that
name is a split name (`validation.jsonl`), otherwise the `train` split.
"""
from __future__ import annotations

import os
from typing import Optional

from llm_recipes.errors import UserError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_NAMES = ("train", "validation", "test")


def load_source(source: str, split: str, *, hub_config: Optional[str] = None):
    """One split of a source, as a datasets.Dataset (UserError listing the splits when it has no such split)."""
    splits = load_splits(source, hub_config=hub_config)
    if split not in splits:
        raise UserError(f"{source} has no {split!r} split; its splits are {', '.join(sorted(splits))}: pass "
                        "another split, or point --dataset.source at data that has it")
    return splits[split]


def load_splits(source: str, *, hub_config: Optional[str] = None) -> dict:
    """Every split of a source: {split name: datasets.Dataset}."""
    if not source or not str(source).strip():
        raise UserError("empty data source: pass --dataset.source (a Hub id, a save_to_disk folder, "
                        "a .jsonl/.json/.csv/.parquet file, or a folder of such files)")
    source = os.path.expanduser(str(source))
    if os.path.isdir(source):
        return _folder(source)
    if os.path.isfile(source):
        return {_split_of(source): _read_file(source)}
    if _looks_like_path(source):
        raise _missing(source)
    return _hub(source, hub_config)


def _missing(source: str) -> UserError:
    return UserError(f"data source {source} does not exist: pass --dataset.source an existing file or folder "
                     "(or a Hub dataset id)")


def _looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that does not exist is a mistyped path."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
            or os.path.splitext(source)[1].lower() in FILE_FORMATS)


def _split_of(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    return stem if stem in SPLIT_NAMES else "train"


def _folder(path: str) -> dict:
    import datasets

    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as error:
            raise UserError(f"cannot read the saved dataset in {path}: {type(error).__name__}: {error}") from None
        if isinstance(loaded, datasets.DatasetDict):
            return dict(loaded)
        return {_split_of(path): loaded}
    files = sorted(f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in FILE_FORMATS)
    if not files:
        raise UserError(f"{path} holds no dataset: expected a save_to_disk folder or split files "
                        f"({', '.join(s + '.jsonl' for s in SPLIT_NAMES)}; .json, .csv and .parquet work too)")
    splits: dict = {}
    for name in files:
        stem = os.path.splitext(name)[0]
        if stem in splits:
            raise UserError(f"{path} has two files for split {stem!r}: keep one of {stem}.* ")
        splits[stem] = _read_file(os.path.join(path, name))
    return splits


def check_json_lines(path: str, limit: Optional[int] = None) -> Optional[dict]:
    """The first row of a .jsonl file, after checking its first `limit` lines (all: None): one line naming
    the file and line of the first problem ("FILE: no examples", "FILE:LINE: not valid JSON (...)")."""
    import itertools
    import json

    first = None
    with open(path, encoding="utf-8", errors="replace") as stream:
        for number, line in enumerate(itertools.islice(stream, limit), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: not a JSON object ({type(row).__name__}): each line is one example")
            first = row if first is None else first
    if first is None and limit is None:
        raise UserError(f"{path}: no examples")
    return first


def _read_file(path: str):
    import datasets

    builder = FILE_FORMATS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise UserError(f"cannot read {path}: data files must end in {', '.join(FILE_FORMATS)}")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: no examples")
    try:
        reader = {"json": datasets.Dataset.from_json, "csv": datasets.Dataset.from_csv,
                  "parquet": datasets.Dataset.from_parquet}[builder]
        data = reader(path, keep_in_memory=True)
    except Exception as error:
        if path.endswith(".jsonl"):
            check_json_lines(path)  # names the file and line of the first bad one
        raise UserError(f"cannot read {path} as {builder}: {type(error).__name__}: "
                        f"{' '.join(str(error).split())[:300]}") from None
    if len(data) == 0:
        raise UserError(f"{path}: no examples")
    return data


FULL_CHECK_BYTES = 512 * 2**20


def first_row(source: str) -> Optional[dict]:
    """A local source's first example, checked (None for Hub ids and saved datasets): what a run's inputs
    check reads before any data set is loaded."""
    source = os.path.expanduser(str(source))
    if os.path.isdir(source):
        if any(os.path.isfile(os.path.join(source, name)) for name in ("dataset_dict.json", "state.json")):
            return None
        files = sorted(os.path.join(source, f) for f in os.listdir(source)
                       if os.path.splitext(f)[1].lower() in FILE_FORMATS)
        if not files:
            _folder(source)  # its own one-line error
        rows = [first_row(f) for f in files]
        return next((row for row in rows if row is not None), None)
    if not os.path.exists(source) and _looks_like_path(source):
        raise _missing(source)
    if not os.path.isfile(source):  # a Hub id: checked when it is loaded
        return None
    if os.path.getsize(source) == 0:
        raise UserError(f"{source}: no examples")
    if source.endswith(".jsonl"):  # every line up to 512 MB (seconds), else the first thousand
        row = check_json_lines(source, limit=None if os.path.getsize(source) < FULL_CHECK_BYTES else 1000)
        if row is None:
            raise UserError(f"{source}: no examples")
        return row
    return None


def _hub(source: str, hub_config: Optional[str]) -> dict:
    import datasets

    try:
        loaded = datasets.load_dataset(source, hub_config)
    except Exception as error:
        message = " ".join(str(error).split())[:300]
        raise UserError(f"cannot load dataset {source!r}{f' ({hub_config})' if hub_config else ''} from the Hugging "
                        f"Face Hub ({type(error).__name__}: {message}); offline, pass --dataset.source a local copy "
                        "(save_to_disk folder or split files)") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
