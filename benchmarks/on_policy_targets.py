"""What an on-policy run trains on: the trainer's own targets on a student's sampled answers, against the same
targets on the data set's answers.

    python -m benchmarks.on_policy_targets --run RUN_DIR [--run RUN_DIR2 ...] [--weights last] [--batches 12] \
        [--max_new_tokens N] [--set FLAG=VALUE ...]

Each RUN_DIR is a finished run of finetuning.py. Its own flags (run_config.json) set up the trainer around its
`--weights` folder as an on-policy run (--distillation_config.lmbda 1, and with it the defaults of distill_eos and
projected_continuation: an off-policy run is measured on the targets an on-policy step would train it on, not on
those it trained with). A run without a logit term (SFT: distil_factor 0) is measured on the targets of the term
`--set` names, e.g. `--set distillation_config.distil_factor=1 --set distillation_config.loss=projected --set
distillation_config.alignment=text`;
on the first --batches training micro-batches, the student samples answers (seed 0) as an on-policy step does,
and the loss term runs on them and on the data set's answers. The targets are read where the trainer uses them
(the family's `token_terms_sum`, wrapped for the run: continuation, EOS and chunking as in training). Per kind of
answer token (the student's EOS, a digit, or other text):
- target: the target's probability of the token the student wrote (sampled) or the data set holds;
- student: the student's own probability of it, and whether it is the student's most likely token (on the
  data set's answers: what greedy decoding would write, given a right prefix);
- eos: the target's / the student's probability of the student's EOS there;
- target_top: whether the target's most likely token is the token (on sampled answers: how often the teacher
  agrees with what the student wrote); kl: KL(target || student) per token, the term's size there.
With it, the sampled answers themselves: their mean length, the share cut at the token limit, and the F1 of their
final answer (the task's `final_answer` line, if it has one) against the data set's answer to the same prompt.

A student that fits the teacher on its own answers (target close to student on "sampled") while it drifts from
it on the teacher's (student far below target on "data") has learnt what on-policy steps ask, and lost what the
data set's answers held. With the run's validation predictions (validation/ or validation-last/), it also
reports the share of answers found verbatim in their prompt (tiny_qa's answers are spans of the context).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


def setup_for(run_dir: Path, weights: str, batches: int, max_new_tokens: int = 0, overrides: dict | None = None):
    from llm_recipes.config import parse_flags
    from llm_recipes.finetuning import epoch_micro_batches, setup

    given = json.loads((run_dir / "run_config.json").read_text())["flags_given"]
    given.pop("resume_from", None)  # the run's weights are loaded as a new run's model
    flags = {**given, "model_name": str(run_dir / weights), "distillation_config.lmbda": 1.0,
             "distillation_config.on_policy_start": 0.0, "run_validation": False, "save_model": False,
             "seed": 0, "output_dir": tempfile.mkdtemp(prefix="on_policy_targets_")}
    if max_new_tokens:
        flags["distillation_config.on_policy_max_new_tokens"] = max_new_tokens
    flags.update(overrides or {})
    state = setup(parse_flags(flags))
    micro = epoch_micro_batches(state, 0)
    return state, [next(micro) for _ in range(batches)]


def read_targets(state, batch: dict) -> list:
    """[(student logits [P, V], tokens [P], target [P, V], weights [P])] of every chunk of the batch's loss term."""
    from llm_recipes import objective
    from llm_recipes.data import move
    from llm_recipes.losses import kl, projection

    seen, wrapped = [], {}

    def spy(original):
        def call(z, targets, zt=None, weights=None, *args, **kwargs):
            if zt is not None:  # the projected family's zt is T log q*, the KL family's the teacher's logits
                paired, temperature = zt.shape[0], args[1] if len(args) > 1 else kwargs.get("temperature", 1.0)
                seen.append((z[:paired, :zt.shape[1]].detach().float() / temperature, targets[:paired].clone(),
                             torch.softmax(zt.detach().float() / temperature, -1), weights.detach().clone()))
            return original(z, targets, zt, weights, *args, **kwargs)
        return call

    for module in (kl, projection):  # the families whose term is token_terms_sum over teacher logits or targets
        wrapped[module] = module.token_terms_sum
        module.token_terms_sum = spy(module.token_terms_sum)
    try:
        with torch.no_grad():
            objective.compute_terms(state.objective, state.models, move(batch, state.info.device), state.info.device,
                                    objective.Answers.SAMPLED)
    finally:
        for module, original in wrapped.items():
            module.token_terms_sum = original
    return seen


def in_prompt_share(run_dir: Path, weights: str):
    """Share of the run's validation answers found verbatim in their prompt (None without predictions)."""
    for folder in (f"validation-{weights}", "validation"):
        path = run_dir / folder / "predictions.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            found = sum(r["prediction"].strip().lower() in r["prompt"].lower() for r in rows if r["prediction"].strip())
            return found / max(len(rows), 1)
    return None


def digit_tokens(tokenizer) -> torch.Tensor:
    """[V] bool: the student tokens whose text is digits (a space marker aside): where a worked sum goes wrong."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([bool(p) and p.lstrip("Ġ▁ ").isdigit() for p in pieces])


def final_marker(dataset_file: str):
    """The task's final-answer marker ("Answer:" for worked answers), or None (a short-answer or custom task)."""
    from llm_distillation.datasets.catalog import task_data, task_names

    task = Path(dataset_file).stem
    return task_data(task).final_answer if task in task_names() else None


def answer_f1(tokenizer, marker, sampled: dict, data: dict) -> list[float]:
    """F1 of each sampled answer (its final line with a marker) against the data set's answer to its prompt."""
    from llm_distillation import metrics
    from llm_recipes.on_policy import answers_of

    out = []
    for answer, reference in zip(answers_of(sampled["student"]), answers_of(data["student"])):
        text, gold = (tokenizer.decode(ids, skip_special_tokens=True) for ids in (answer, reference))
        if marker:
            text, gold = metrics.final_answer(text, marker), metrics.final_answer(gold, marker)
        out.append(100 * metrics.token_f1(text, gold))
    return out


def measure(run_dir: Path, weights: str, batches: int, max_new_tokens: int = 0,
            overrides: dict | None = None) -> dict:
    from llm_recipes import objective
    from llm_recipes.on_policy import Stats

    state, micro_batches = setup_for(run_dir, weights, batches, max_new_tokens, overrides)
    if state.on_policy is None:
        raise SystemExit(f"{run_dir}: no on-policy set-up: a run without a logit term (SFT) needs the term's flags "
                         "through --set (e.g. distillation_config.distil_factor=1, distillation_config.loss=projected)")
    state.models.student.eval()
    state.on_policy.stats = Stats()
    train = state.run.train
    precision = lambda: objective.autocast(state.info.device, train.mixed_precision, train.use_fp16)
    eos = state.student_tokenizer.eos_token_id
    digit = digit_tokens(state.student_tokenizer).to(state.info.device)
    sums = collections.defaultdict(collections.Counter)
    marker, f1s = final_marker(state.run.dataset.file), []
    torch.manual_seed(0)
    for batch in micro_batches:
        (sampled,) = state.on_policy.batches(state.models.student_inner, [batch], state.pad_ids, state.info.device,
                                             False, precision)  # sampled at the run's precision, as it trained
        f1s += answer_f1(state.student_tokenizer, marker, sampled, batch)
        for source, rebuilt in (("sampled", sampled), ("data", batch)):
            for z, tokens, target, weights_ in read_targets(state, rebuilt):
                log_q = torch.log_softmax(z, -1)
                q = log_q.exp()
                kl = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_q), 0.0).sum(-1)
                keep = weights_ > 0
                rows = keep.nonzero().squeeze(1)
                at = tokens[rows]
                is_digit = digit[at.clamp(0, digit.numel() - 1)]
                text = at != eos
                for kind, mask in (("eos", ~text), ("digit", text & is_digit), ("text", text & ~is_digit)):
                    r, t = rows[mask], at[mask]
                    figures = sums[(source, kind)]
                    figures["n"] += int(r.numel())
                    figures["target"] += float(target[r, t].sum())
                    figures["student"] += float(q[r, t].sum())
                    figures["student_top"] += int((q[r].argmax(-1) == t).sum())
                    figures["target_top"] += int((target[r].argmax(-1) == t).sum())
                    figures["kl"] += float(kl[r].sum())
                    figures["target_eos"] += float(target[r, eos].sum())
                    figures["student_eos"] += float(q[r, eos].sum())
    stats = state.on_policy.stats
    out = {"run": str(run_dir), "sampled_tokens": stats.tokens / max(stats.answers, 1),
           "sampled_cut": stats.cut / max(stats.answers, 1), "sampled_f1": sum(f1s) / max(len(f1s), 1),
           "answers_in_prompt": in_prompt_share(run_dir, weights)}
    for (source, kind), figures in sorted(sums.items()):
        n = max(figures["n"], 1)
        out[f"{source} {kind}"] = {"tokens": figures["n"], **{k: figures[k] / n for k in
                                                             ("target", "student", "student_top", "target_eos",
                                                              "student_eos", "target_top", "kl")}}
    shutil.rmtree(state.run.train.output_dir, ignore_errors=True)  # the set-up's scratch folder
    return out


def flag_value(item: str) -> tuple[str, object]:
    """"section.flag=value" -> (flag, value): a Python literal where it reads as one (1, 0.5, True), else text."""
    import ast

    if "=" not in item:
        raise SystemExit(f"--set {item}: write FLAG=VALUE, e.g. --set distillation_config.loss=projected")
    key, value = item.split("=", 1)
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, type=Path)
    parser.add_argument("--weights", default="last", help="the run's folder to load: last or best")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--max_new_tokens", type=int, default=0,
                        help="the longest sampled answer (0: the run's own on_policy_max_new_tokens)")
    parser.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                        help="a finetuning.py flag over the run's own (repeatable), e.g. the term of an SFT run")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = dict(flag_value(item) for item in args.set)
    results = [measure(run, args.weights, args.batches, args.max_new_tokens, overrides) for run in args.run]
    print("| run | answers | tokens | target p(token) | student p(token) | student's top is the token | target p(EOS) "
          "| student p(EOS) | target's top is the token | KL(target, student) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        name = Path(result["run"]).name
        for key, figures in result.items():
            if isinstance(figures, dict) and figures["tokens"]:
                print(f"| {name} | {key} | {figures['tokens']} | {figures['target']:.3f} | {figures['student']:.3f} | "
                      f"{figures['student_top']:.3f} | {figures['target_eos']:.3f} | {figures['student_eos']:.3f} | "
                      f"{figures['target_top']:.3f} | {figures['kl']:.3f} |")
        share = result["answers_in_prompt"]
        print(f"| {name} | sampled answers: {result['sampled_tokens']:.2f} tokens, {result['sampled_cut']:.3f} cut, "
              f"F1 {result['sampled_f1']:.1f} against the data set's; validation answers found in their prompt: "
              f"{'-' if share is None else f'{share:.3f}'} | | | | | | | | |")
    return results


if __name__ == "__main__":
    main()
