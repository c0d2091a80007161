"""Your own data (--dataset.source required): prompt/response, Alpaca, Dolly, chat `messages` or plain `text`.

See docs/tasks.md.
"""
from llm_distillation.datasets.tasks import make_get_split

get_split = make_get_split("generic")
