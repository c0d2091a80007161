"""The tiny synthetic QA set shipped in assets/tiny/data (SQuAD's schema): the default demo run. See docs/tasks.md."""
from llm_distillation.datasets.tasks import make_get_split

get_split = make_get_split("tiny_qa")
