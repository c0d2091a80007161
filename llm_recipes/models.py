"""Loading the student and the teacher, and reading their last hidden states.

The losses never see `[batch, seq, vocab]` logits. `forward_hidden` runs a model's own forward but
stops at its output projection (a pre-hook records what the projection would receive and hands it an
empty slice), and `output_head` returns the projection as a function of rows, so the loss code can
compute logits only at answer positions, a chunk of rows at a time. `check_output_head` verifies on
real inputs that this path reproduces the model's own logits, so an architecture that post-processes
its logits in a way we do not know is refused instead of silently trained on the wrong objective.

A model name may also be a `.gguf` file (e.g. the real pair of examples/real_pair): transformers' GGUF
loader reads it, every weight is dequantized to the run's dtype, and the result is an ordinary model
that trains and saves as safetensors.
"""
from __future__ import annotations

import contextlib
import os
import socket
from functools import lru_cache
from typing import Callable, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from llm_recipes.errors import UserError

GGUF_VERSION = "0.19.0"  # requirements.txt's pin of the gguf package, named when it is missing


# ----------------------------------------------------------------------------------------- locating
def _looks_like_local_path(name: str) -> bool:
    first = name.split("/")[0]
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or (first != name and os.path.exists(first)))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub instead of huggingface_hub's minute of retries."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _gguf_file(name: str, what: str) -> Optional[str]:
    """The absolute path of the .gguf file `name` names; None for a folder or a hub id."""
    if not name.lower().endswith(".gguf"):
        return None
    path = os.path.abspath(os.path.expanduser(name))
    if not os.path.isfile(path):
        raise UserError(f"{what} GGUF file {name} does not exist")
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader reads the file with it)
    except ImportError:
        raise UserError(f"{what} {name} is a GGUF file, which needs the gguf package: "
                        f"pip install gguf=={GGUF_VERSION}") from None
    return path


def locate(name: str, what: str, probe_file: str = "config.json") -> tuple[str, dict]:
    """Return (name or path, extra from_pretrained kwargs) or fail at once with a UserError.

    A .gguf file gives (its folder, {"gguf_file": the file}): config, tokenizer and weights come from it."""
    from huggingface_hub import try_to_load_from_cache

    gguf_path = _gguf_file(name, what)
    if gguf_path:
        return os.path.dirname(gguf_path), {"gguf_file": gguf_path}
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded, {}
    if _looks_like_local_path(name):
        raise UserError(f"{what} path {name} does not exist: pass an existing model folder or a hub id")
    cached = isinstance(try_to_load_from_cache(name, probe_file), str)
    if _hub_offline() or not hub_reachable():
        if cached:
            return name, {"local_files_only": True}
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the Hugging Face hub is unreachable"
        raise UserError(f"{what} {name} is not a local folder nor in the Hugging Face cache and {why}: "
                        f"download it first (hf download {name}) or pass a local path")
    return name, {}


# ------------------------------------------------------------------------------------------ loading
def load_tokenizer(name: str, *, trust_remote_code: bool = False, what: str = "tokenizer"):
    """Tokenizer with a pad token (the EOS token when the tokenizer has none), padding on the right."""
    from transformers import AutoTokenizer

    path, extra = locate(name, what, probe_file="tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the {what} from {name}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError(f"the {what} {name} has no pad, eos or unk token: give it a pad token")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


def load_config(name: str, *, trust_remote_code: bool = False, what: str = "model"):
    """Only the model's config.json (e.g. its maximum length when its weights are not needed)."""
    from transformers import AutoConfig

    path, extra = locate(name, what)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the {what} config from {name}: {str(error).splitlines()[0]}") from None


def load_model(name: str, *, encoder_decoder: bool, dtype: torch.dtype, trust_remote_code: bool = False,
               attn_implementation: Optional[str] = None, what: str = "model") -> nn.Module:
    """A causal LM (AutoModelForCausalLM) or, with encoder_decoder, a seq2seq LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path, extra = locate(name, what)
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if "gguf_file" in extra:
        # Unpack every weight at load time: the loader then also drops its quantizer marker (with it,
        # save_pretrained refuses the model) and the model is a plain, trainable one.
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(dequantize=True)
    auto = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as error:
        message = str(error).splitlines()[0]
        hint = ""
        if "Unrecognized configuration class" in message:
            hint = " (is it encoder-decoder? then add --encoder_decoder for the student or " \
                   "--distillation_config.encoder_decoder for the teacher)"
        raise UserError(f"cannot load the {what} from {name}: {message}{hint}") from None
    if "gguf_file" in extra:
        # The file, not its folder, is then what a LoRA adapter on this model names as its base.
        model.name_or_path = model.config.name_or_path = extra["gguf_file"]
        print(f"{what}: weights dequantized from GGUF {name} to {str(dtype).removeprefix('torch.')}")
    return model


def freeze_teacher(model: nn.Module) -> nn.Module:
    """Teacher: eval mode (no dropout), no parameter ever requires a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList of one of the model's no-split classes."""
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if block_names and type(module[0]).__name__ not in block_names:
                continue
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}")
    return best


def freeze_first_layers(model: nn.Module, num_layers: int) -> None:
    """llama-recipes' --freeze_layers: the first `num_layers` transformer blocks stop training."""
    layers = decoder_layers(model)
    if num_layers > len(layers):
        raise UserError(f"--num_freeze_layers {num_layers} exceeds the student's {len(layers)} layers")
    for layer in layers[:num_layers]:
        layer.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ------------------------------------------------------------------------------ hidden states, head
@contextlib.contextmanager
def _capture_head_input(model: nn.Module):
    head = model.get_output_embeddings()
    if head is None:
        raise UserError(f"{type(model).__name__} has no output embeddings (lm head): not a language model")
    captured = {}

    def hook(module, args):
        hidden = args[0]
        captured["hidden"] = hidden
        return (hidden[..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def model_inputs(model: nn.Module, batch: dict, encoder_decoder: bool) -> dict:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if encoder_decoder:
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return inputs


def forward_hidden(model: nn.Module, batch: dict, encoder_decoder: bool,
                   inner: Optional[nn.Module] = None) -> torch.Tensor:
    """The hidden states the model's output projection would see: [batch, seq, hidden].

    `model` is what is called (possibly a DDP/FSDP wrapper), `inner` the Hugging Face model inside it.
    For an encoder-decoder these are the decoder's hidden states, aligned with `labels` (no shift).
    """
    return forward_outputs(model, batch, encoder_decoder, inner)[0]


def forward_outputs(model: nn.Module, batch: dict, encoder_decoder: bool, inner: Optional[nn.Module] = None,
                    **extra) -> tuple:
    """(what the output projection would see, the model's output object), e.g. with
    `output_hidden_states=True` for the intermediate layers (llm_recipes.intermediate)."""
    inner = inner if inner is not None else model
    with _capture_head_input(inner) as captured:
        outputs = model(**model_inputs(inner, batch, encoder_decoder), **extra)
    if "hidden" not in captured:
        raise UserError(f"{type(model).__name__} never called its output projection in forward")
    return captured["hidden"], outputs


def output_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """rows [n, hidden] -> logits [n, vocab], including the bias some seq2seq models add."""
    head = model.get_output_embeddings()
    bias = getattr(model, "final_logits_bias", None)
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def project(rows: torch.Tensor) -> torch.Tensor:
        logits = head(rows)
        if bias is not None:
            logits = logits + bias.reshape(-1)[: logits.shape[-1]].to(logits.dtype)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return project


@torch.no_grad()
def check_output_head(model: nn.Module, batch: dict, encoder_decoder: bool, what: str) -> None:
    """Refuse to train when hidden states + `output_head` differ from the model's own logits."""
    was_training = model.training
    model.eval()
    try:
        logits = model(**model_inputs(model, batch, encoder_decoder)).logits
        expected = logits.float()
        ours = output_head(model)(forward_hidden(model, batch, encoder_decoder)).float()
    finally:
        model.train(was_training)
    if torch.isnan(expected).any() or (expected == float("inf")).any():  # -inf: a masked entry, allowed
        raise UserError(f"the {what} ({type(model).__name__}) gives NaN or +inf logits on the first training batch: "
                        "its weights hold NaN or inf (a broken checkpoint or conversion)")
    scale = expected.abs().max().clamp_min(1e-6)
    error = ((ours - expected).abs().max() / scale).item()
    tolerance = 1e-4 if logits.dtype == torch.float32 else 2e-2  # bf16 weights or FSDP's bf16 compute
    if ours.shape != expected.shape or not error <= tolerance:
        raise UserError(f"the {what} ({type(model).__name__}) post-processes its logits in a way this trainer "
                        f"does not reproduce (relative difference {error:.2e}): please report the architecture")


def max_positions(config, limit=None):
    """Longest sequence a model accepts (None: no fixed limit), capped by `limit`."""
    found = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "relative_attention_num_buckets", None):
        found = None  # relative positions (T5 family)
    candidates = [v for v in (found, limit) if v]
    return min(candidates) if candidates else None
