"""tiny_qa_worked: the tiny task's questions with a worked step, then "Answer: ..." (the tiny on-policy benchmark's
long-answer task). Its data is generated: python -m examples.tiny.worked writes it to
~/.cache/llm-distill/tiny_qa_worked. See docs/on_policy.md."""
from llm_distillation.datasets.tasks import make_get_split

get_split = make_get_split("tiny_qa_worked")
