"""DialogSum (Hub `knkarthick/dialogsum`), evaluated on test with ROUGE-Lsum. See docs/tasks.md."""
from llm_distillation.datasets.tasks import make_get_split

get_split = make_get_split("dialogsum")
