"""How good a target the projected teacher gives: on the tiny pair, with the shipped teacher's real
distributions, at every served student answer token of the training answers.

    python -m benchmarks.projection_targets [--examples 3000]

Prints the share of student answer tokens the projection serves, the share of served tokens where the
target's most likely student token is the actual next student token, and the target's mean probability
of the actual token (the teacher's confidence carried onto the student's vocabulary). The teacher reads
the teacher-side rows built by the trainer's own data path (the tiny_qa loader, gold answers).
"""
import argparse

import torch


def measure(examples: int) -> dict:
    from transformers import AutoModelForCausalLM

    from configs import dataset
    from configs.paths import TINY_QA_LOADER, TINY_STUDENT, TINY_TEACHER
    from llm_recipes import alignment, data, models
    from llm_recipes.losses.pairing import pair_by_groups
    from llm_recipes.losses.projection import Projection, projected_target

    student_tok, teacher_tok = models.load_tokenizer(TINY_STUDENT), models.load_tokenizer(TINY_TEACHER)
    teacher = AutoModelForCausalLM.from_pretrained(TINY_TEACHER).eval()
    pmap = alignment.ProjectionMap.build(teacher_tok, student_tok)
    split = data.build_paired_split(data.import_loader(TINY_QA_LOADER), dataset(), "train",
                                    student_tokenizer=student_tok, student_name=TINY_STUDENT,
                                    student_encoder_decoder=False, student_max=None, teacher_tokenizer=teacher_tok,
                                    teacher_name=TINY_TEACHER)
    split = data.attach_alignment(split, student_tok, teacher_tok, pmap)
    batches = data.PairedBatches(split, student_tok.pad_token_id, teacher_tok.pad_token_id)
    hits = served = total = 0
    mass = 0.0
    for start in range(0, min(examples, len(split)), 64):
        batch = batches[list(range(start, min(start + 64, examples, len(split))))]
        s, t = batch["student"], batch["teacher"]
        pairing = pair_by_groups(s["labels"], t["labels"], s["alignment_group"], t["alignment_group"],
                                 student_nodes=s["projection_node"])
        with torch.no_grad():
            hidden = models.forward_hidden(teacher, t, False)
            logits = models.output_head(teacher)(hidden.reshape(-1, hidden.shape[-1])[pairing.teacher_rows]).float()
        target, ok = projected_target(logits[:, :len(teacher_tok)], pairing.nodes, Projection(pmap), 1.0,
                                      len(student_tok))
        actual = pairing.student_targets[: pairing.num_paired]
        hits += int((target.argmax(dim=1) == actual)[ok].sum())
        mass += float(target.gather(1, actual[:, None]).squeeze(1)[ok].sum())
        served += int(ok.sum())
        total += int((s["labels"] != -100).sum())
    return {"student_answer_tokens": total, "served_share": served / total, "argmax_is_actual_share": hits / served,
            "mean_target_probability_of_actual": mass / served}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=3000)
    args = parser.parse_args(argv)
    print(measure(args.examples))


if __name__ == "__main__":
    main()
