"""people_qa, the real-pair demo's synthetic task (two hops, arithmetic on stated numbers; SQuAD's schema),
evaluated on test with F1. Its data is generated, not shipped: python -m examples.real_pair.people_qa writes
it to ~/.cache/llm-distill/people_qa (the default --dataset.source). See docs/tasks.md."""
from llm_distillation.datasets.tasks import make_get_split

get_split = make_get_split("people_qa")
