"""people_qa_worked: people_qa's questions answered with worked steps, then "Answer: ..." on a line of its own
(the on-policy benchmark's long-answer task). Its data is generated, not shipped: python -m
examples.real_pair.people_qa writes it (the `worked` column) to ~/.cache/llm-distill/people_qa. See docs/tasks.md."""
from llm_distillation.datasets.tasks import make_get_split

get_split = make_get_split("people_qa_worked")
