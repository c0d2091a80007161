"""Greedy answers from a causal or an encoder-decoder checkpoint (what a benchmark needs from a student).

- Causal models: prompts are left-padded, so every row's new tokens start at the same column, and
  the prompt columns are cut off the output.
- Encoder-decoder models (T5, mT0, BART...): the prompt is the encoder input and is right-padded.
  Left padding would be wrong for models with learned absolute positions: BART's encoder states change
  under left padding (tests/test_methods.py measures it), while T5's relative positions do not care.
  Decoding starts from the model's `decoder_start_token_id` (pad for T5, EOS for BART, from its
  generation config) and the output holds decoder tokens only, so nothing is cut off.
Both decode greedily (no sampling), stop at EOS, and return the text without special tokens.

Batches run longest prompt first: similar lengths share a batch (less padding), and a batch size that
does not fit in memory fails in the first minute rather than hours into a run. `generate_batches`
yields each batch's answers with their prompt indices as soon as they exist (what a resumable run
writes out); `generate_answers` returns them all in prompt order. `stop_strings=["\n"]` stops a row
at its first newline: with greedy decoding its first line is unchanged, and a teacher that would
otherwise write 150 tokens of which only the first line is kept writes a few. (The check decodes
the row's new tokens; transformers' own `stop_strings` matches token strings and fails on some
vocabularies, e.g. WordPiece.)
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def pad_prompts(prompts: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        cols = slice(width - len(prompt), width) if left else slice(0, len(prompt))
        ids[row, cols] = torch.tensor(prompt, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


class StopOnText:
    """A stopping criterion: a row is done once its decoded new text contains one of `stops`."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, tuple(stops), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def first_line(text: str) -> str:
    """What the published pipeline keeps of a completion: the text before its first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def longest_first(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Prompt indices, longest first; ties keep their order (stable), so a run is reproducible."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def generate_batches(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                     batch_size: int = 8, pad_token_id: Optional[int] = None,
                     stop_strings: Optional[list[str]] = None) -> Iterator[tuple[list[int], list[str]]]:
    """Greedy completions, one (prompt indices, answers) pair per batch, longest prompts first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoder_decoder = is_encoder_decoder(model)
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = longest_first(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            ids, mask = pad_prompts([list(prompts[i]) for i in indices], pad, left=not encoder_decoder)
            stop = {}
            if stop_strings:  # an encoder-decoder's output holds decoder tokens only
                from transformers import StoppingCriteriaList

                width = 0 if encoder_decoder else ids.shape[1]
                stop = {"stopping_criteria": StoppingCriteriaList([StopOnText(tokenizer, stop_strings, width)])}
            with torch.inference_mode():
                output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                        num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad, **stop)
            new_tokens = output if encoder_decoder else output[:, ids.shape[1]:]
            yield indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)


def generate_answers(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                     batch_size: int = 8, pad_token_id: Optional[int] = None,
                     stop_strings: Optional[list[str]] = None, progress: bool = False) -> list[str]:
    """Greedy completions of token-id prompts, in prompt order; works for causal and encoder-decoder models."""
    from tqdm.auto import tqdm

    answers: list[Optional[str]] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress) as bar:
        for indices, texts in generate_batches(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size, pad_token_id=pad_token_id,
                                               stop_strings=stop_strings):
            for i, text in zip(indices, texts):
                answers[i] = text
            bar.update(len(indices))
    return answers
