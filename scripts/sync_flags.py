"""Write docs/flags.md, the reference of every flag of `python finetuning.py`, from the config dataclasses.

    python -m scripts.sync_flags            # rewrite docs/flags.md
    python -m scripts.sync_flags --check    # exit 1 if docs/flags.md is out of date (the tests run this)
"""
import sys
from pathlib import Path

from configs.paths import REPO_ROOT
from llm_recipes.config import flag_reference

PATH = Path(REPO_ROOT) / "docs" / "flags.md"
HEADER = """# Flags of `python finetuning.py`

Every flag, its default and its meaning, generated from the dataclasses in `configs/` by
`python -m scripts.sync_flags` (a test fails when this file is out of date). Undotted flags set
`train_config`; the others are `--<config>.<field>` (or `--<config>_<field>`, the MultiLevelOT README's
spelling). `python finetuning.py --help` prints the same, grouped by topic.

"""


def text() -> str:
    return HEADER + flag_reference(markdown=True) + "\n"


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        if not PATH.is_file() or PATH.read_text() != text():
            print("docs/flags.md is out of date: run python -m scripts.sync_flags")
            sys.exit(1)
        print("docs/flags.md is up to date")
    else:
        PATH.write_text(text())
        print(f"{PATH} written")
