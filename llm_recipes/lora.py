"""LoRA adapters on the student through peft, and merging a saved adapter into its base model.

    python -m llm_recipes.lora OUTPUT/last MERGED_DIR [--base_model PATH_OR_ID] [--dtype bfloat16]
    (also `llm-distill-merge-lora` and scripts/merge_lora.py)

MERGED_DIR is an ordinary Hugging Face folder (model.safetensors, config, tokenizer) that loads with
AutoModelForCausalLM.from_pretrained, without peft.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from llm_recipes import flags
from llm_recipes.errors import UserError
from llm_recipes.flags import option


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


def is_adapter_dir(path: str) -> bool:
    """A checkpoint folder of a --use_peft run (peft's adapter_config.json next to the adapter weights)."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


def load_adapter_model(adapter_dir: str, *, dtype, base_model: str | None = None,
                       trust_remote_code: bool = False) -> tuple[nn.Module, str]:
    """(the base model named in adapter_config.json with the adapter on it, frozen; where its tokenizer is:
    the adapter folder when it holds one, else the base model)."""
    import json

    from peft import PeftModel

    from llm_recipes import models

    adapter_dir = str(Path(adapter_dir).expanduser())
    if not is_adapter_dir(adapter_dir):
        raise UserError(f"{adapter_dir} holds no adapter_config.json: pass a checkpoint folder of a --use_peft run")
    config_file = Path(adapter_dir) / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    base_name = base_model or adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"{config_file} does not name its base model: pass --base_model")
    base = models.load_model(base_name, encoder_decoder=adapter_config.get("task_type") == "SEQ_2_SEQ_LM",
                             dtype=dtype, trust_remote_code=trust_remote_code, what="LoRA base model")
    model = PeftModel.from_pretrained(base, adapter_dir)
    tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_name
    return model, tokenizer_source


def merge_adapter(adapter_dir: str, output_dir: str, base_model: str | None = None, dtype: str = "auto") -> Path:
    """Fold a saved LoRA adapter into its base model and write an ordinary Hugging Face folder
    (safetensors, config, tokenizer) that loads without peft."""
    import torch

    from llm_recipes import models

    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise UserError(f"--dtype {dtype} is not a torch dtype: use auto, float32, bfloat16 or float16")
    model, tokenizer_source = load_adapter_model(
        adapter_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype), base_model=base_model)
    merged = model.merge_and_unload()
    output = Path(output_dir)
    merged.save_pretrained(output)
    models.load_tokenizer(tokenizer_source, what="tokenizer").save_pretrained(output)
    return output


@dataclass(frozen=True)
class MergeArgs:
    """Arguments of the merge command (the two folders may be given without their flag names)."""

    adapter_dir: str = option(help="checkpoint folder of a --use_peft run (e.g. OUTPUT/last)")
    output_dir: str = option(help="where to write the merged model")
    base_model: Optional[str] = option(None, "base model (default: the one named in adapter_config.json)")
    dtype: str = option("auto", "auto (the base model's), float32, bfloat16 or float16")


MERGE = flags.Command(program="python -m llm_recipes.lora", summary="Merge a LoRA checkpoint into a full model.",
                      sections={"args": MergeArgs}, positional=("adapter_dir", "output_dir"))


def _merge(args: MergeArgs) -> None:
    output = merge_adapter(args.adapter_dir, args.output_dir, args.base_model, args.dtype)
    print(f"merged model written to {output}")


main, cli = flags.entry_points(MERGE, lambda parsed: _merge(parsed["args"]))

if __name__ == "__main__":
    cli()
