"""Regenerate the generated blocks of README.md (the flag reference) from configs/.

    python -m scripts.sync_readme            # rewrite README.md
    python -m scripts.sync_readme --check    # exit 1 if README.md is out of date (the tests run this)
"""
import re
import sys
from pathlib import Path

from configs.paths import REPO_ROOT
from llm_recipes.config import flag_reference


def generated_blocks() -> dict:
    return {"flags": flag_reference(markdown=True)}


def sync(text: str) -> str:
    for name, body in generated_blocks().items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


if __name__ == "__main__":
    readme = Path(REPO_ROOT) / "README.md"
    text = readme.read_text()
    if "--check" in sys.argv[1:]:
        if sync(text) != text:
            print("README.md is out of date: run python -m scripts.sync_readme")
            sys.exit(1)
        print("README.md is up to date")
    else:
        readme.write_text(sync(text))
        print("README.md updated")
