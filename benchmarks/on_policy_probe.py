"""Why on-policy distillation helps or not, measured on a student: its sampled answers, and what the teacher
says about them.

    python -m benchmarks.on_policy_probe --student DIR [--student DIR2 ...] --teacher DIR \
        --data PEOPLE_QA_FOLDER --answers TEACHER_ANSWERS_FOLDER [--task people_qa_worked] [--batches 6]

For every student, on the first --batches training micro-batches (batch 8) of the task, through the trainer's
own set-up (projected teacher, text alignment, lmbda 1):
- sample quality: the answers the student samples (temperature 1, as on-policy training draws them): their mean
  length, the share cut at the token limit, and the F1 of their final answer against the gold one;
- agreement: at every student answer token the projection serves, whether the teacher's projected target puts
  its highest probability on the token the student wrote, on the student's sampled answers and on the teacher's
  own answers (the data set's);
- the loss: the projected KL per served token, on sampled answers and on the teacher's answers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch


def batches_of(args, student: str):
    from llm_recipes.config import parse_flags
    from llm_recipes.finetuning import epoch_micro_batches, setup

    flags = {"model_name": student, "distillation": True, "distillation_config.model_name": args.teacher,
             "dataset.file": f"llm_distillation/datasets/loader/{args.task}.py", "dataset.source": args.answers,
             "dataset.answer_column": "answers_generated", "dataset.few_shot": 0, "batch_size_training": 8,
             "distillation_config.loss": "projected", "distillation_config.lmbda": 1.0,
             "distillation_config.on_policy_max_new_tokens": args.max_new_tokens, "mixed_precision": True,
             "run_validation": False, "save_model": False, "seed": 0,
             "output_dir": tempfile.mkdtemp(prefix="on_policy_probe_")}
    state = setup(parse_flags(flags))
    micro = epoch_micro_batches(state, 0)
    return state, [next(micro) for _ in range(args.batches)]


@torch.no_grad()
def agreement(state, batch: dict) -> tuple[int, int, float]:
    """(served tokens, tokens where the teacher's projected target's mode is the student's token, summed KL)."""
    from llm_recipes import models, objective
    from llm_recipes.data import batch_alignment, move
    from llm_recipes.losses.pairing import pair_by_groups
    from llm_recipes.losses.projection import projected_target

    device, spec = state.info.device, state.objective.spec
    batch = move(batch, device)
    teacher = objective.teacher_forward(state.objective, state.models.teacher, batch, device)
    student_hidden = models.forward_hidden(state.models.student_inner, batch["student"], False)
    align = batch_alignment(batch)
    pairing = pair_by_groups(batch["student"]["labels"], batch["teacher"]["labels"], align["student_groups"],
                             align["teacher_groups"], student_nodes=align["student_nodes"])
    if not pairing.num_paired:
        return 0, 0, 0.0
    rows_s = pairing.student_rows[: pairing.num_paired]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])[rows_s]
    h_t = teacher.head_input.reshape(-1, teacher.head_input.shape[-1])[pairing.teacher_rows]
    z_s = models.output_head(state.models.student_inner)(h_s).float()[:, : spec.student_vocab_size]
    z_t = models.output_head(state.models.teacher)(h_t).float()[:, : spec.teacher_vocab_size]
    target, served = projected_target(z_t, pairing.nodes, spec.options.projection, 1.0, spec.student_vocab_size)
    tokens = pairing.student_targets[: pairing.num_paired].to(device)
    agree = (target.argmax(-1) == tokens) & served
    log_q = torch.log_softmax(z_s, -1)
    kl = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_q), 0.0).sum(-1)
    return int(served.sum()), int(agree.sum()), float(kl[served].sum())


def probe(args, student: str) -> dict:
    from llm_distillation import metrics
    from llm_recipes.on_policy import Stats, answers_of

    state, batches = batches_of(args, student)
    state.models.student.eval()
    final = "Answer:" if args.task == "people_qa_worked" else ""
    sampled_figures, data_figures, f1s = [0, 0, 0.0], [0, 0, 0.0], []
    state.on_policy.stats = Stats()
    torch.manual_seed(0)
    for batch in batches:
        (rebuilt,) = state.on_policy.batches(state.models.student_inner, [batch], state.pad_ids, state.info.device,
                                             False, lambda: torch.autocast(state.info.device.type, torch.bfloat16))
        for figures, source in ((sampled_figures, rebuilt), (data_figures, batch)):
            served, agree, kl = agreement(state, source)
            figures[0] += served
            figures[1] += agree
            figures[2] += kl
        tokenizer = state.student_tokenizer
        for answer, gold in zip(answers_of(rebuilt["student"]), answers_of(batch["student"])):
            text, reference = (tokenizer.decode(ids, skip_special_tokens=True) for ids in (answer, gold))
            if final:
                text, reference = metrics.final_answer(text, final), metrics.final_answer(reference, final)
            f1s.append(100 * metrics.token_f1(text, reference))
    stats = state.on_policy.stats
    return {"student": student, "answers": stats.answers, "sampled_tokens": stats.tokens / max(stats.answers, 1),
            "cut_share": stats.cut / max(stats.answers, 1),
            "sampled_final_f1_vs_teacher_answer": statistics.mean(f1s),
            "agreement_on_sampled": sampled_figures[1] / max(sampled_figures[0], 1),
            "agreement_on_teacher_answers": data_figures[1] / max(data_figures[0], 1),
            "kl_per_token_on_sampled": sampled_figures[2] / max(sampled_figures[0], 1),
            "kl_per_token_on_teacher_answers": data_figures[2] / max(data_figures[0], 1),
            "served_tokens_sampled": sampled_figures[0], "served_tokens_teacher": data_figures[0]}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", action="append", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--answers", required=True, help="the teacher's answers (llm_distillation.generate's folder)")
    parser.add_argument("--task", default="people_qa_worked")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--max_new_tokens", type=int, default=160)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = [probe(args, student) for student in args.student]
    keys = list(rows[0])[1:]
    print("| student | " + " | ".join(keys) + " |\n| --- |" + " ---: |" * len(keys))
    for row in rows:
        print(f"| {row['student']} | " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])
                                                    for k in keys) + " |")
    return rows


if __name__ == "__main__":
    main()
