"""Regenerate the generated blocks of README.md (the flag reference) from configs/."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_recipes.config import flag_reference  # noqa: E402


def generated_blocks() -> dict:
    return {"flags": flag_reference(markdown=True)}


def sync(text: str) -> str:
    for name, body in generated_blocks().items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(sync(readme.read_text()))
    print("README.md updated")
