"""From a task's examples to a model's answers: loading the model, the prompts, their token ids.

Shared by the teacher-answer generation (`generate.py`) and the benchmark (`benchmark.py`), so the
teacher and a student see prompts built by the same code as the trainer's task loader
(`llm_distillation.prompts.build_prompt`):

- few-shot examples come from the task's train split (`select_shots`), never the example itself, and
  are the same for every run with the same seed;
- prompt token ids come from `tasks.encode_prompt`, the trainer's own encoding (causal: one BOS, then
  the text; encoder-decoder: the tokenizer's special tokens ending with EOS), so a student is
  benchmarked on exactly the prompt tokens it was trained on.
"""
from __future__ import annotations

from typing import Optional, Sequence

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
    model.to(inference_device()).eval().requires_grad_(False)
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
