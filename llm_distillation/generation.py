"""Everything between a task's examples and a model's answers: loading the model, the prompts and their
token ids, and greedy decoding. The teacher-answer generation (`generate.py`) and the benchmark
(`benchmark.py`) both use it.

Prompts. Teacher and students see prompts built by the same code as the trainer's task loader
(`llm_distillation.prompts.build_prompt`):

- few-shot examples come from the task's train split (`select_shots`), never the example itself, and
  are the same for every run with the same seed;
- prompt token ids come from `tasks.encode_prompt`, the trainer's own encoding (causal: one BOS, then
  the text; encoder-decoder: the tokenizer's special tokens ending with EOS), so a student is
  benchmarked on exactly the prompt tokens it was trained on.

Decoding (greedy answers from a causal or an encoder-decoder checkpoint):
- Causal models: prompts are left-padded, so every row's new tokens start at the same column, and
  the prompt columns are cut off the output.
- Encoder-decoder models (T5, mT0, BART...): the prompt is the encoder input and is right-padded.
  Left padding would be wrong for models with learned absolute positions: BART's encoder states change
  under left padding (tests/test_methods.py measures it), while T5's relative positions do not care.
  Decoding starts from the model's `decoder_start_token_id` (pad for T5, EOS for BART, from its
  generation config) and the output holds decoder tokens only, so nothing is cut off.
Both decode greedily (no sampling), stop at EOS, and return the text without special tokens. A task with worked
answers (its catalog row's `final_answer`, "Answer:") keeps every line up to its final answer's (`kept_answer`)
and stops a row once that line is written.

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

import re
from typing import Iterator, Optional, Sequence

import torch

from llm_recipes import lora, models
from llm_recipes.errors import UserError


# ------------------------------------------------------------------------------------------ models
def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_generation(name: str, *, tokenizer_name: Optional[str] = None, base_model: Optional[str] = None,
                        bf16: bool = False, trust_remote_code: bool = False):
    """(model in eval mode on the inference device, its tokenizer) from a model folder, a hub id, or the
    folder of a LoRA adapter (detected by its adapter_config.json; merged into its base for speed)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    if lora.is_adapter_dir(name):
        model, tokenizer_source = lora.load_adapter_model(name, dtype=dtype, base_model=base_model,
                                                          trust_remote_code=trust_remote_code)
        model = model.merge_and_unload()
    else:
        if base_model:
            raise UserError(f"--base_model only applies to a LoRA adapter folder, and {name} holds no "
                            "adapter_config.json: remove --base_model")
        config = models.load_config(name, trust_remote_code=trust_remote_code)
        model = models.load_model(name, encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
                                  dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer_source = name
    tokenizer = models.load_tokenizer(tokenizer_name or tokenizer_source, trust_remote_code=trust_remote_code,
                                      what="tokenizer" if tokenizer_name else "model")
    # No requires_grad_(False): decoding runs under inference_mode anyway, and with frozen bf16 parameters
    # on CPU (torch 2.13) generate's prefill (the output layer on the last position only, a strided
    # [B, 1, H] slice) takes torch.matmul's unfolded path: the [V, H] output weight expanded to [B, H, V]
    # and copied, B copies of the embedding matrix (5 GB for 16 Gemma 3 prompts: 38 s against 1.7 s).
    model.to(inference_device()).eval()
    return model, tokenizer


def max_prompt_positions(model) -> Optional[int]:
    """Longest input the model accepts (None: no fixed limit, e.g. T5's relative positions)."""
    from llm_recipes.models import max_positions

    return max_positions(model.config)


# ----------------------------------------------------------------------------------------- prompts
def uses_chat_template(tokenizer, chat: Optional[bool]) -> bool:
    """chat=None: the template when the tokenizer has one; True without a template is an error."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise UserError(f"--chat needs a tokenizer with a chat template, and {tokenizer.name_or_path} has none: "
                        "remove --chat")
    return has_template if chat is None else bool(chat)


def shot_pool(task: str, split: str, examples, *, k: int, source: Optional[str], seed: int):
    """The examples few-shot prompts draw from: the task's train split (None when k is 0)."""
    if k == 0:
        return None
    if split == "train":
        return examples
    from llm_distillation.datasets.tasks import load_examples

    return load_examples(task, "train", source=source, seed=seed)


def build_prompts(task: str, examples, tokenizer, *, k: int, pool, seed: int, chat: bool, encoder_decoder: bool,
                  title: bool = False, progress: bool = True) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, their token ids), one per example, with k shots from `pool` (never the example
    itself); `title`: the `Title:` line of the teachers published with it (prompts.prompt_uses_title)."""
    from tqdm.auto import tqdm

    from llm_distillation.datasets.tasks import encode_prompt, select_shots
    from llm_distillation.prompts import build_prompt

    texts, ids = [], []
    for example in tqdm(examples, total=len(examples), desc="building prompts", unit="example",
                        disable=not progress):
        shots = select_shots(pool, k, seed=seed, exclude_id=example["id"]) if k else ()
        texts.append(build_prompt(task, example, tokenizer, shots=shots, chat=chat, title=title))
        ids.append(encode_prompt(texts[-1], tokenizer, encoder_decoder=encoder_decoder))
    return texts, ids


def fitting_prompts(prompts: Sequence[Sequence[int]], limit: Optional[int], max_new_tokens: int, *,
                    skip: bool) -> list[int]:
    """Indices of the prompts that leave room for max_new_tokens; refuses the rest unless skip."""
    if limit is None:
        return list(range(len(prompts)))
    fits = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens <= limit]
    too_long = len(prompts) - len(fits)
    if too_long and not skip:
        longest = max(len(p) for p in prompts)
        raise UserError(f"{too_long} of {len(prompts)} prompts plus --max_new_tokens {max_new_tokens} exceed the "
                        f"model's {limit} positions (longest prompt: {longest} tokens): lower --few_shot or "
                        "--max_new_tokens, or pass --skip_too_long to leave them out (counted in the summary)")
    return fits


# ------------------------------------------------------------------------------------------ decoding
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
    """A stopping criterion: a row is done once its decoded new text contains one of `stops` (a worked answer's:
    once it holds a whole line that starts with `final_line`, its final answer)."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int, final_line: str = ""):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, tuple(stops), prompt_width
        self.final = re.compile(rf"(^|\n)\s*{re.escape(final_line)}[^\n]*\n") if final_line else None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        done = [any(s in t for s in self.stops) or bool(self.final and self.final.search(t)) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def first_line(text: str) -> str:
    """What the published pipeline keeps of a completion: the text before its first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def kept_answer(text: str, final_line: str = "") -> str:
    """What is kept of a completion: its first line; for a worked answer (`final_line`, the prefix of its last
    line: llm_distillation.datasets.catalog) every line up to and including the first line that starts with it."""
    if not final_line:
        return first_line(text)
    lines = text.strip().splitlines()
    end = next((i + 1 for i, line in enumerate(lines) if line.strip().startswith(final_line)), len(lines))
    return "\n".join(line.rstrip() for line in lines[:end]).strip()


def longest_first(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Prompt indices, longest first; ties keep their order (stable), so a run is reproducible."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def generate_batches(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                     batch_size: int = 8, pad_token_id: Optional[int] = None,
                     stop_strings: Optional[list[str]] = None,
                     final_line: str = "") -> Iterator[tuple[list[int], list[str]]]:
    """Greedy completions, one (prompt indices, answers) pair per batch, longest prompts first (`final_line`: a
    worked answer's final-answer prefix, after whose line a row stops)."""
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
            if stop_strings or final_line:  # an encoder-decoder's output holds decoder tokens only
                from transformers import StoppingCriteriaList

                width = 0 if encoder_decoder else ids.shape[1]
                criterion = StopOnText(tokenizer, stop_strings or (), width, final_line)
                stop = {"stopping_criteria": StoppingCriteriaList([criterion])}
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
