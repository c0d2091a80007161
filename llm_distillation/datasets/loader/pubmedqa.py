"""PubMedQA (Hub `qiaojin/PubMedQA`, pqa_labeled), evaluated on 500 labelled examples with ROUGE-Lsum.

See docs/tasks.md.
"""
from llm_distillation.datasets.tasks import make_get_split

get_split = make_get_split("pubmedqa")
