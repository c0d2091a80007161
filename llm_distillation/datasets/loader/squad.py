"""SQuAD v1.1 (Hub `rajpurkar/squad`), evaluated on validation with F1. See docs/tasks.md."""
from llm_distillation.datasets.tasks import make_get_split

get_split = make_get_split("squad")
