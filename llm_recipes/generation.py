"""Greedy answers from a causal or an encoder-decoder checkpoint (what a benchmark needs from a student).

- Causal models: prompts are left-padded, so every row's new tokens start at the same column, and
  the prompt columns are cut off the output.
- Encoder-decoder models (T5, mT0, BART...): the prompt is the encoder input and is right-padded.
  Left padding would be wrong for models with learned absolute positions: BART's encoder states change
  under left padding (tests/test_methods.py measures it), while T5's relative positions do not care.
  Decoding starts from the model's `decoder_start_token_id` (pad for T5, EOS for BART, from its
  generation config) and the output holds decoder tokens only, so nothing is cut off.
Both decode greedily (no sampling), stop at EOS, and return the text without special tokens.
"""
from __future__ import annotations

from typing import Optional

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


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 64, batch_size: int = 8,
                     pad_token_id: Optional[int] = None) -> list[str]:
    """Greedy completions of token-id prompts, in order; works for causal and encoder-decoder models."""
    encoder_decoder = is_encoder_decoder(model)
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = pad_prompts(prompts[start:start + batch_size], pad, left=not encoder_decoder)
            output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                    num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad)
            new_tokens = output if encoder_decoder else output[:, ids.shape[1]:]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers
