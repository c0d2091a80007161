"""Merge a LoRA checkpoint (adapter_model.safetensors + adapter_config.json) into a full model.

    python scripts/merge_lora.py OUTPUT/last MERGED_DIR [--base_model PATH_OR_ID] [--dtype bfloat16]

MERGED_DIR is an ordinary Hugging Face folder (model.safetensors, config, tokenizer) that loads with
AutoModelForCausalLM.from_pretrained, without peft.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_recipes.errors import UserError  # noqa: E402
from llm_recipes.lora import merge_adapter  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter_dir", help="checkpoint folder of a --use_peft run (e.g. OUTPUT/last)")
    parser.add_argument("output_dir", help="where to write the merged model")
    parser.add_argument("--base_model", default=None, help="base model (default: the one named in adapter_config.json)")
    parser.add_argument("--dtype", default="auto", help="auto (the base model's), float32, bfloat16 or float16")
    args = parser.parse_args(argv)
    try:
        output = merge_adapter(args.adapter_dir, args.output_dir, args.base_model, args.dtype)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print(f"merged model written to {output}")


if __name__ == "__main__":
    main()
