"""Teacher-answer generation and the benchmark, end to end on the tiny random models.

Their answers are garbage, so these tests check mechanics: counts, ids, resume, file formats,
first-line cutting, empty-answer dropping, the validation split, scores recomputed from the
predictions, encoder-decoder students and LoRA adapters.
"""
import json
from pathlib import Path

import pytest
import torch

from conftest import qa_rows


# ------------------------------------------------------------------------------------- generation
def test_first_line_and_longest_first():
    from llm_recipes.generation import first_line, longest_first

    assert first_line("  Paris  \nmore text") == "Paris" and first_line("\nParis") == "" and first_line("") == ""
    assert longest_first([[1], [1, 2, 3], [1, 2], [4, 5, 6]]) == [1, 3, 2, 0]  # ties keep their order


def test_stop_on_text_stops_each_row_and_keeps_the_text_before_it(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_recipes.generation import generate_answers

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    model = AutoModelForCausalLM.from_pretrained(tiny["student"])
    prompts = [tokenizer.encode(f"context: {r['context']} question: {r['question']} answer:") for r in qa_rows(6, 3)]
    full = generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    one_by_one = [generate_answers(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert full == one_by_one  # longest-first batching returns answers in prompt order
    stop = full[0].split()[1]  # a word the random model writes: stands in for "\n"
    stopped = generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=4, stop_strings=[stop])
    assert [s.split(stop)[0] for s in stopped] == [f.split(stop)[0] for f in full]
    assert all(len(s) <= len(f) for s, f in zip(stopped, full)) and len(stopped[0]) < len(full[0])
