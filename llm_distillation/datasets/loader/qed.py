"""QED (Hub `google-research-datasets/qed`, a Natural Questions subset), evaluated on validation with F1.

See docs/tasks.md.
"""
from llm_distillation.datasets.tasks import make_get_split

get_split = make_get_split("qed")
