"""Dolly (databricks-dolly-15k, or MiniLLM's copy and split), evaluated on MiniLLM's 500 test examples with ROUGE-L.

See docs/tasks.md.
"""
from llm_distillation.datasets.tasks import make_get_split

get_split = make_get_split("dolly")
