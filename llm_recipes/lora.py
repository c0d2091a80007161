"""LoRA adapters on the student through peft."""
from __future__ import annotations

from torch import nn

from llm_recipes.errors import UserError


def add_lora(model: nn.Module, lora_config, encoder_decoder: bool) -> nn.Module:
    """Wrap the student in a peft LoRA model; only the adapter weights train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_config.r, lora_alpha=lora_config.lora_alpha, target_modules=lora_config.target_modules,
        lora_dropout=lora_config.lora_dropout, bias=lora_config.bias,
        task_type="SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"cannot add LoRA to {type(model).__name__}: {str(error).splitlines()[0]}; "
                        "name the layers with --lora_config.target_modules q_proj,v_proj") from None


def load_lora_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """The base student with the adapter of a checkpoint folder, trainable (for --resume_from)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, path, is_trainable=True)
