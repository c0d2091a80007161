"""Distill a teacher LLM into a student: `python finetuning.py --help` lists every flag."""
import fire

from llm_recipes.finetuning import main

if __name__ == "__main__":
    fire.Fire(main)
