"""A smaller student cut from a pretrained decoder: keep a subset of its layers (DistilBERT's way of
initialising a student from a deeper model), everything else (embeddings, final norm, head,
tokenizer) as it is.

    python -m examples.real_pair.smaller_student --model_name ~/.cache/llm-distill/real_pair/smollm2-135m-instruct \
        --layers 10 --output_dir ~/.cache/llm-distill/real_pair/smollm2-10-layers

Why: Gemma 3 270M has only twice SmolLM2-135M's parameters, and a full SmolLM2 fine-tuned on the
teacher's answers comes close to the teacher; a student with a third of the layers leaves the teacher
room to help, and trains about twice as fast on a CPU. The kept layers are spread evenly from the first
to the last (`evenly_spaced`), so the model keeps its input and output ends.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from llm_recipes import flags
from llm_recipes.errors import UserError
from llm_recipes.flags import option


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` layer indices from 0 to total-1 inclusive, as evenly spread as integers allow."""
    if not 1 <= keep <= total:
        raise UserError(f"--layers must be between 1 and the model's {total} layers, got {keep}")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def keep_layers(model, indices: list[int]):
    """Cut `model` (a transformers decoder whose base model holds its blocks as `layers`: Llama, Gemma,
    Qwen, Mistral, GPT-NeoX ...) down to the blocks `indices`, in place.

    Each kept block and attention module gets its new position as `layer_idx` (the KV cache is indexed by
    it), and the config's per-layer lists (Gemma's `layer_types`) are cut the same way."""
    import torch

    decoder = model.base_model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"{type(model).__name__} keeps no `layers` list in its base model: only decoders such as "
                        "Llama, Gemma, Qwen, Mistral or GPT-NeoX can be cut by layers")
    decoder.layers = torch.nn.ModuleList(layers[i] for i in indices)
    for new_index, layer in enumerate(decoder.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    total = config.num_hidden_layers
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == total and name != "architectures":
            setattr(config, name, [value[i] for i in indices])
    config.num_hidden_layers = len(indices)
    return model


@dataclass(frozen=True)
class SmallerStudentArgs:
    """Flags of `python -m examples.real_pair.smaller_student`."""

    model_name: str = option(None, "a Hugging Face folder (or hub id) of a decoder-only model")
    layers: int = option(10, "how many layers to keep, evenly spaced from the first to the last")
    output_dir: str = option(None, "where the smaller model goes (safetensors, tokenizer, generation config)")


def make_smaller_student(args: SmallerStudentArgs) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not args.model_name or not args.output_dir:
        raise UserError("pass --model_name (the model to cut) and --output_dir (where the smaller one goes)")
    out = Path(args.output_dir).expanduser()
    if (out / "smaller_student.json").is_file():
        print(f"smaller student: {out} (already made)")
        return out
    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(Path(args.model_name).expanduser(), dtype="auto")
    total = model.config.num_hidden_layers
    before = sum(p.numel() for p in model.parameters())
    indices = evenly_spaced(total, args.layers)
    keep_layers(model, indices)
    after = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(Path(args.model_name).expanduser()).save_pretrained(out)
    try:
        GenerationConfig.from_pretrained(Path(args.model_name).expanduser()).save_pretrained(out)
    except OSError:
        pass  # the model has no generation config: transformers' defaults apply
    record = {"source": str(args.model_name), "kept_layers": indices, "of_layers": total,
              "parameters": after, "source_parameters": before}
    (out / "smaller_student.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"smaller student: {out}: layers {indices} of {total}, {after:,} of {before:,} parameters "
          f"({time.time() - start:.1f} s)")
    return out


COMMAND = flags.Command(program="python -m examples.real_pair.smaller_student",
                        summary=__doc__.strip().splitlines()[0], sections={"args": SmallerStudentArgs})
main, cli = flags.entry_points(COMMAND, lambda parsed: make_smaller_student(parsed["args"]))

if __name__ == "__main__":
    cli()
