"""Why ULD at the seeds' factor 1.5 costs accuracy on the tiny task: measured, on the validation split.

    python -m examples.tiny.uld_study --output_dir output/demo     (after, or sharing runs with, the demo)

Three measurements, each on seed 0 and the validation split (the test split is the demo's, untouched):
1. The gradient at the first answer position, before training: from the untrained or pretrained
   student and the teacher's logits on the validation questions, the share of positions where ULD's
   gradient raises the student's top token, split by whether that token is right, and where it raises
   the right token (cross-entropy always does). ULD compares sorted probabilities, so its gradient
   cannot depend on which token is right.
2. A sweep, every row at one learning rate (the demo's SFT rate for the regime): ULD by index and by
   text at factors 0.1, 0.5 and 1.5, ULD by text at temperature 2, beside SFT and the projected
   teacher. Validation F1, the last epoch's train CE and distillation term, validation CE, and the
   share of answers that start with the most common first word.
3. Learning curves of each term (train CE, distillation term) of those runs: uld_curves.png.

Output in --output_dir/uld_study: results.md, results.json, uld_curves.png. Runs share the demo's
folders (runs/<regime>/...), so rows the demo already trained are reused.
"""
from __future__ import annotations

import collections
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from examples import harness
from examples.tiny import demo
from llm_recipes import flags
from llm_recipes.errors import UserError
from llm_recipes.flags import option

ULD_ROWS = tuple(
    harness.Row(f"ULD {alignment} {factor:g}" + (" T=2" if temperature != 1 else ""), "student", "uld", alignment,
             {"distillation_config.loss": "uld", "distillation_config.alignment": alignment,
              "distillation_config.distil_factor": factor,
              **({"distillation_config.student_temperature": temperature,
                  "distillation_config.teacher_temperature": temperature} if temperature != 1 else {})})
    for alignment, factor, temperature in (("index", 0.1, 1), ("index", 0.5, 1), ("text", 0.1, 1), ("text", 0.5, 1),
                                           ("text", 1.5, 2)))
# the demo's own rows at the seeds' factor (their folders are reused), SFT and the projected teacher
REUSED = tuple(row for row in demo.ROWS if row.name in ("SFT", "ULD index 1.5", "ULD text", "projected"))


# ------------------------------------------------------------------------------ 1. the gradient at step 0
def sorted_l1_gradient(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """d/dz_s of sum_i |sort(softmax z_s)_i - sort(softmax z_t)_i| (float64, rows of one position each;
    the shorter vocabulary padded with zeros, as ULD does)."""
    z = student_logits.double().detach().requires_grad_(True)
    p, q = torch.softmax(z, -1), torch.softmax(teacher_logits.double(), -1)
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1])).sort(-1, descending=True).values
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1])).sort(-1, descending=True).values
    (p - q).abs().sum().backward()
    return z.grad


def first_position_logits(model_path: Path, examples: list[dict], role: str) -> tuple[torch.Tensor, list[int]]:
    """Logits at the first answer position of every example (the trainer's own prompt and tokenization),
    and the first answer token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_distillation import prompts
    from llm_distillation.datasets import tasks

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    rows, first = [], []
    for example in examples:
        prompt = prompts.build_prompt("tiny_qa", example, tokenizer)
        encoded = tasks.tokenize_example(prompt, example["answers"][0], tokenizer, role=role, encoder_decoder=False)
        start = next(i for i, label in enumerate(encoded["labels"]) if label != -100)
        with torch.no_grad():
            logits = model(torch.tensor([encoded["input_ids"][:start]])).logits[0, -1]
        rows.append(logits)
        first.append(encoded["labels"][start])
    return torch.stack(rows), first


def gradient_shares(student: Path, teacher: Path, examples: list[dict]) -> dict:
    """Where ULD's gradient (descent direction) raises the student's top token and the right token."""
    student_logits, right = first_position_logits(student, examples, "student")
    teacher_logits, _ = first_position_logits(teacher, examples, "teacher")
    counts = collections.Counter()
    for z_s, z_t, gold in zip(student_logits, teacher_logits, right):
        step = -sorted_l1_gradient(z_s, z_t)  # gradient descent moves the logits along this
        top = int(z_s.argmax())
        counts["positions"] += 1
        counts["top right"] += top == gold
        counts["raises top"] += bool(step[top] > 0)
        counts["raises top, top wrong"] += bool(step[top] > 0 and top != gold)
        counts["top wrong"] += top != gold
        counts["raises right, top wrong"] += bool(step[gold] > 0 and top != gold)
    n, wrong = counts["positions"], max(counts["top wrong"], 1)
    return {"positions": n, "top_is_right": counts["top right"] / n, "uld_raises_top": counts["raises top"] / n,
            "uld_raises_top_when_wrong": counts["raises top, top wrong"] / wrong,
            "uld_raises_right_when_top_wrong": counts["raises right, top wrong"] / wrong}


# ------------------------------------------------------------------------------------------ 2. the sweep
def last_epoch_means(metrics: list[dict], key: str) -> Optional[float]:
    train = [r for r in metrics if r["type"] == "train" and key in r]
    if not train:
        return None
    last = max(r["epoch"] for r in train)
    return statistics.mean(r[key] for r in train if r["epoch"] == last)


def first_words(predictions: Path) -> tuple[str, float]:
    words = [(json.loads(line)["prediction"].split() or [""])[0] for line in predictions.read_text().splitlines()]
    word, count = collections.Counter(words).most_common(1)[0]
    return word, count / len(words)


def sweep_row(setup: demo.Setup, row: harness.Row, regime: str, lr: float) -> dict:
    run_dir = demo.train_row(setup, row, regime, 0, lr)
    f1 = harness.score(run_dir / "best", setup.data, "validation", run_dir / "validation")
    metrics = harness.read_metrics(run_dir)
    evals = [r for r in metrics if r["type"] == "eval"]
    word, share = first_words(run_dir / "validation" / "predictions.jsonl")
    return {"name": row.name, "validation_f1": f1, "train_ce": last_epoch_means(metrics, "ce"),
            "train_distill": last_epoch_means(metrics, "distill"), "validation_ce": evals[-1]["eval_ce"],
            "first_word": word, "first_word_share": share, "run": str(run_dir)}


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 3.6 * len(curves)), squeeze=False)
    for (regime, runs), (ce_ax, distill_ax) in zip(curves.items(), axes):
        for index, (name, metrics) in enumerate(runs.items()):
            train = [r for r in metrics if r["type"] == "train"]
            color = f"C{index % 10}"  # one colour per row in both panels
            window = 20
            for ax, key in ((ce_ax, "ce"), (distill_ax, "distill")):
                values = [r.get(key) for r in train]
                if None in values or not values or (key == "distill" and name == "SFT"):
                    continue
                smooth = [statistics.mean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
                ax.plot([r["step"] for r in train], smooth, label=name, linewidth=1, color=color)
        ce_ax.set(title=f"{regime} students: train CE (mean of {window} steps)", xlabel="step", yscale="log")
        distill_ax.set(title=f"{regime} students: distillation term", xlabel="step", yscale="log")
        ce_ax.legend(fontsize=7)
        distill_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(results: dict) -> str:
    out = ["### The gradient at the first answer position, before training", "",
           "| students | positions | student's top token is right | ULD raises the top token | ... when it is "
           "wrong | ULD raises the right token when the top is wrong |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for regime, g in results["gradient"].items():
        out.append(f"| {regime} | {g['positions']} | {g['top_is_right']:.0%} | {g['uld_raises_top']:.0%} | "
                   f"{g['uld_raises_top_when_wrong']:.0%} | {g['uld_raises_right_when_top_wrong']:.0%} |")
    for regime, rows in results["sweep"].items():
        out += ["", f"### {regime} students, seed 0, lr {results['lr'][regime]:g}", "",
                "| row | validation F1 | train CE (last epoch) | distillation term (last epoch) | validation CE | "
                "most common first word of the answers |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for r in rows:
            distill = "—" if r["train_distill"] is None or r["name"] == "SFT" else f"{r['train_distill']:.3f}"
            out.append(f"| {r['name']} | {r['validation_f1']:.1f} | {r['train_ce']:.3f} | {distill} | "
                       f"{r['validation_ce']:.3f} | \"{r['first_word']}\" {r['first_word_share']:.0%} |")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class StudyArgs:
    """Flags of `python -m examples.tiny.uld_study`."""

    output_dir: str = option("output/demo", "the demo's output folder (its runs are reused)")
    regimes: str = option("random,pretrained", "student regimes: random and/or pretrained")
    lr: Optional[float] = option(None, "one rate for every row; None: the demo's SFT rate (details.json), else 2e-3")
    jobs: int = option(2, "runs at a time (each on one thread)")


COMMAND = flags.Command(program="python -m examples.tiny.uld_study", summary=__doc__.strip().splitlines()[0],
                        sections={"args": StudyArgs})


def run_study(args: StudyArgs) -> dict:
    from llm_distillation.datasets import tasks

    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if not regimes or any(r not in demo.REGIMES for r in regimes):
        raise UserError(f"--regimes must be a comma-separated subset of {', '.join(demo.REGIMES)}, "
                        f"got {args.regimes!r}")
    demo_args = demo.DemoArgs(output_dir=args.output_dir, seeds=1, jobs=args.jobs)
    setup = demo.prepare(demo_args)
    out = setup.out / "uld_study"
    out.mkdir(parents=True, exist_ok=True)
    details = setup.out / "details.json"
    rates = json.loads(details.read_text())["rates"] if details.exists() else {}
    lr = {r: args.lr or rates.get(r, {}).get("SFT", {}).get("lr", 2e-3) for r in regimes}
    examples = [dict(e) for e in tasks.load_examples("tiny_qa", "validation", source=str(setup.data))]
    harness.step("the gradient at the first answer position (validation questions)")
    gradient = {r: gradient_shares(demo.student_init(setup, "student", r, 0), setup.teacher, examples)
                for r in regimes}
    harness.step(f"the sweep: {len(ULD_ROWS) + len(REUSED)} rows per regime (seed 0)")
    keys = [(r, row) for r in regimes for row in (*REUSED, *ULD_ROWS)]
    found = harness.in_parallel(args.jobs, [lambda r=r, row=row: sweep_row(setup, row, r, lr[r]) for r, row in keys])
    sweep = {r: [f for (regime, _), f in zip(keys, found) if regime == r] for r in regimes}
    results = {"lr": lr, "gradient": gradient, "sweep": sweep}
    curves = {r: {row["name"]: harness.read_metrics(Path(row["run"])) for row in sweep[r]} for r in regimes}
    plot_curves(curves, out / "uld_curves.png")
    text = markdown(results)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    harness.step(f"done: {out / 'results.md'}, {out / 'uld_curves.png'}")
    return results


main, cli = flags.entry_points(COMMAND, lambda parsed: run_study(parsed["args"]))

if __name__ == "__main__":
    sys.exit(cli())
