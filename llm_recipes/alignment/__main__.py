"""python -m llm_recipes.alignment: the alignment inspector (llm_recipes.alignment.inspector)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llm_recipes.alignment.inspector import cli  # noqa: E402

cli()
