"""Merge a LoRA checkpoint (adapter_model.safetensors + adapter_config.json) into a full model.

    python scripts/merge_lora.py OUTPUT/last MERGED_DIR [--base_model PATH_OR_ID] [--dtype bfloat16]

The command is `llm_recipes.lora.main` (also installed as `llm-distill-merge-lora`).
"""
import fire

from llm_recipes.lora import main

if __name__ == "__main__":
    fire.Fire(main)
