"""Distill a teacher LLM into a student: `python finetuning.py --help` lists every flag (the recipe is
llm_recipes/finetuning.py; also installed as `llm-distill-train`)."""
from llm_recipes.finetuning import cli

if __name__ == "__main__":
    cli()
