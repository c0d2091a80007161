"""The task catalog: one row per task, the only place a task is registered.

A row (`TaskData`) says where the task's examples come from and how its source columns map onto a
normalized example (llm_distillation.datasets.tasks reads that), how its prompt is written
(`PromptSpec`, rendered by llm_distillation.prompts), how many few-shot examples a teacher gets
(per teacher family where the published runs fixed it, `teacher_shots`, else `shots`), and which split
its results are reported on. Adding a task is one row here and a loader file
`llm_distillation/datasets/loader/<task>.py` holding `get_split = make_get_split("<task>")`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from configs.paths import TINY_QA_DATA
from llm_recipes.errors import UserError


@dataclass(frozen=True)
class PromptSpec:
    """How one task turns a normalized example into a prompt."""

    request: str  # the example's part of the prompt, `{field}` placeholders (str.format)
    cue: str  # the line the answer follows in a plain prompt
    system: str = ""  # instruction of the chat prompt's system turn
    separator: str = " "  # between a plain prompt and its answer
    title: bool = False  # whether the task has an optional `Title:` line
    optional: tuple = ()  # (field, text) pairs: `text` is added only when the field is non-empty


@dataclass(frozen=True)
class TeacherShots:
    """Few-shot setting of one teacher family on one task (ULD/MultiLevelOT published values)."""

    pattern: str  # lower-case substring of the teacher's model name or path
    shots: int
    title: bool = False  # whether the teacher's prompt carries the `Title:` line


QA_PROMPT = PromptSpec(
    request="Context: {context}\nQuestion: {question}", cue="Answer:", title=True,
    system=("You are an agent answering questions as part of a reading comprehension activity. You must read and "
            "understand the context text step by step. Answers consist of 0 to 5 words, exclusively continuous "
            "words taken from the contextual text provided."))

INSTRUCTION_PROMPT = PromptSpec(
    request="Below is an instruction that describes a task{input_note}. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n{input_block}",
    cue="### Response:\n", separator="",
    optional=(("input", ("input_note", ", paired with an input that provides further context")),
              ("input", ("input_block", "\n### Input:\n{input}\n"))))


@dataclass(frozen=True)
class TaskData:
    """One task: its data, its prompt, its shots."""

    source: str  # default --dataset.source (Hub id or path)
    fields: dict  # normalized field -> source column candidates, first present wins
    answers: tuple  # column groups, first group whose first column is present wins; its columns are concatenated
    prompt: PromptSpec = INSTRUCTION_PROMPT
    shots: int = 0  # teacher shots for a family without a `teacher_shots` row (Qwen, Gemma, ...)
    teacher_shots: tuple = ()  # TeacherShots rows: the published setting per teacher family
    eval_split: str = "validation"  # the split the published results are measured on
    hub_config: Optional[str] = None  # Hub configuration of the default source
    id: tuple = ("id",)  # id column candidates; none present: "<split>-<row>"
    optional: tuple = ("title",)  # fields that may be absent from the source ("" then)
    generated_column: str = "answers_generated"  # the teacher's answers (--dataset.generated_by default)
    carve: dict = field(default_factory=lambda: {"validation": 0.1})  # split -> size cut off train when missing
    carve_head: bool = False  # cut the first rows instead of a seeded random draw (MiniLLM's Dolly dev set)
    split_aliases: dict = field(default_factory=dict)  # source split -> the split it serves as
    merge_on: Optional[str] = None  # rows with the same value of this field are one example, all answers kept
    notes: str = ""
    build_hint: str = ""  # how to make the default source when it is generated, not downloaded
    final_answer: str = ""  # worked answers: the prefix of their last line, which holds what F1/EM score ("" :
    #                         an answer is one line, and a model's answer is its first line)


def _published(llama: int, mistral: int, falcon: int, mistral_title: bool = False) -> tuple:
    """The ULD / MultiLevelOT teachers' shots; a teacher of another family gets the Llama-2 setting (`shots`)."""
    return (TeacherShots("llama-2", llama), TeacherShots("mistral", mistral, title=mistral_title),
            TeacherShots("falcon", falcon))


_SQUAD_FIELDS = {"title": ("title",), "context": ("context",), "question": ("question",)}
PEOPLE_QA_SYSTEM = ("Read the facts about several people and answer the question. Some questions need two facts, "
                    "or a number worked out from the numbers stated. Answer with a name, a few words from the text, "
                    "or a number, and nothing else.")

PEOPLE_QA_WORKED_SYSTEM = ("Read the facts about several people and answer the question step by step: name the "
                           "facts you use, each hop of a two-hop question, and write a sum out digit by digit. Then "
                           "give the final answer on a line of its own, as 'Answer: ...'.")

TASK_DATA: dict[str, TaskData] = {
    # SQuAD v1.1: answers = {"text": [...], "answer_start": [...]}
    "squad": TaskData(source="rajpurkar/squad", fields=_SQUAD_FIELDS, answers=(("answers",),), prompt=QA_PROMPT,
                      shots=1, teacher_shots=_published(1, 3, 4, mistral_title=True)),
    # QED (Hub): example_id, title_text, question, paragraph_text, original_nq_answers = [{start, end, string}]
    "qed": TaskData(
        source="google-research-datasets/qed", id=("id", "example_id"),
        answers=(("answers",), ("original_nq_answers",)),
        fields={"title": ("title", "title_text"), "context": ("context", "paragraph_text"),
                "question": ("question", "question_text")},
        prompt=QA_PROMPT, shots=5, teacher_shots=_published(5, 5, 3, mistral_title=True)),
    # FairytaleQA: WorkInTheDark (story_name, story_section, question, answer1, answer2) or the GEM copy
    # (story_name, content, question, answer, gem_id)
    "fairytaleqa": TaskData(
        source="WorkInTheDark/FairytaleQA", eval_split="test", id=("id", "gem_id"),
        fields={"title": ("title", "story_name"), "context": ("context", "story_section", "content"),
                "question": ("question",)},
        answers=(("answers",), ("answer1", "answer2"), ("answer",)), carve={"test": 0.1, "validation": 0.1},
        prompt=PromptSpec(
            request=QA_PROMPT.request, cue="Answer:", title=True,
            system=("You are an expert agent in reading comprehension (question answering). You must read and "
                    "understand the contextual text step by step, then answer the question. The answer must be "
                    "brief, between 0 and 15 words.")),
        shots=2, teacher_shots=_published(2, 4, 2)),
    # PubMedQA pqa_labeled (1000 rows, one `train` split): pubid, question, context = {contexts: [...], ...},
    # long_answer, final_decision. The reference is the long answer (scored with ROUGE); half (500) is the test set.
    "pubmedqa": TaskData(
        source="qiaojin/PubMedQA", hub_config="pqa_labeled", eval_split="test", id=("id", "pubid"), optional=(),
        fields={"context": ("context",), "question": ("question",)}, answers=(("answers",), ("long_answer",)),
        carve={"test": 0.5, "validation": 0.1},
        prompt=PromptSpec(
            request="Medical paper: {context}\nQuestion: {question}", cue="Answer:",
            system=("You are a medical expert reading a medical research paper. You must answer the question based "
                    "exclusively on the information given. The answer is the summary of the research paper's "
                    "conclusion. This conclusion should be as short as possible, straight to the point and without "
                    "re-explaining the experimental parts in detail.")),
        shots=3, teacher_shots=_published(3, 3, 3)),
    # DialogSum: id, dialogue, summary, topic. Its test split has 3 summaries per dialogue (1500 rows,
    # ids test_<n>_<k>): merged into 500 examples with 3 references.
    "dialogsum": TaskData(
        source="knkarthick/dialogsum", eval_split="test", optional=(), fields={"dialogue": ("dialogue",)},
        answers=(("answers",), ("summary",)), generated_column="summary_generated",
        carve={"test": 0.1, "validation": 0.1}, merge_on="dialogue",
        prompt=PromptSpec(
            request="Dialogue: {dialogue}", cue="Summary:",
            system=("You're an expert at summarizing dialogues. You have to read the dialogue between two people and "
                    "summarize it in no more than one sentence. The summary should be as short as possible, not "
                    "re-explaining the dialogue in detail and using the person's name when implicitly mentioned.")),
        shots=3, teacher_shots=_published(3, 2, 2)),
    # Dolly: databricks (instruction, context, response, category; one `train` split) or MiniLLM's copy
    # (raw.jsonl + valid.jsonl with instruction, input, output): MiniLLM's dev set is raw[:1000], its
    # test set valid.jsonl (500). From the databricks file the same sizes are cut off its head.
    "dolly": TaskData(
        source="databricks/databricks-dolly-15k", eval_split="test", optional=("input",),
        fields={"instruction": ("instruction",), "input": ("input", "context")},
        answers=(("answers",), ("output",), ("response",)), carve={"test": 500, "validation": 1000},
        carve_head=True, split_aliases={"raw": "train", "valid": "test"}),
    # tiny_qa: the synthetic demo set shipped in assets/tiny/data (SQuAD's schema); the QA prompt without the
    # system turn, so the tiny demo models' short contexts hold it
    "tiny_qa": TaskData(source=str(TINY_QA_DATA), fields=_SQUAD_FIELDS, answers=(("answers",),), eval_split="test",
                        carve={"test": 0.1, "validation": 0.1},
                        prompt=PromptSpec(request=QA_PROMPT.request, cue="Answer:", title=True)),
    # people_qa: the real-pair demo's synthetic task (two hops, arithmetic on stated numbers), written by
    # `python -m examples.real_pair.people_qa` outside the repository (SQuAD's schema plus a `kind` column);
    # some answers are computed, not copied
    "people_qa": TaskData(source="~/.cache/llm-distill/people_qa", fields=_SQUAD_FIELDS, answers=(("answers",),),
                          eval_split="test", carve={"test": 0.1, "validation": 0.1},
                          build_hint="write it with python -m examples.real_pair.people_qa",
                          prompt=PromptSpec(request=QA_PROMPT.request, cue="Answer:", system=PEOPLE_QA_SYSTEM),
                          shots=3),
    # tiny_qa_worked: tiny_qa's questions with a worked step ("The fact: ...") before "Answer: ...", written by
    # `python -m examples.tiny.worked` (the tiny version of the on-policy benchmark's long-answer task)
    "tiny_qa_worked": TaskData(
        source="~/.cache/llm-distill/tiny_qa_worked", fields=_SQUAD_FIELDS, answers=(("worked",),),
        eval_split="test", carve={"test": 0.1, "validation": 0.1},
        build_hint="write it with python -m examples.tiny.worked",
        prompt=PromptSpec(request=QA_PROMPT.request, cue="Reasoning:", title=True), final_answer="Answer:"),
    # people_qa_worked: the same questions answered with their worked steps (the facts used, each hop named, sums
    # digit by digit), then "Answer: ..." on a line of its own; F1/EM score that line, ROUGE-L the steps
    "people_qa_worked": TaskData(
        source="~/.cache/llm-distill/people_qa", fields=_SQUAD_FIELDS, answers=(("worked",),), eval_split="test",
        carve={"test": 0.1, "validation": 0.1}, build_hint="write it with python -m examples.real_pair.people_qa",
        prompt=PromptSpec(request=QA_PROMPT.request, cue="Reasoning:", system=PEOPLE_QA_WORKED_SYSTEM),
        shots=3, final_answer="Answer:"),
}

# The generic task: a user's own data (its schemas: llm_distillation.datasets.tasks.GENERIC_SCHEMAS); the
# normalized row says which schema it came from, and so which prompt (llm_distillation.prompts.GENERIC_SPECS).
GENERIC = TaskData(source="", fields={}, answers=(), carve={"validation": 0.1})


def task_names() -> tuple:
    """Every task `--task` / a loader accepts, the generic one last."""
    return tuple(TASK_DATA) + ("generic",)


def task_data(task: str) -> TaskData:
    if task == "generic":
        return GENERIC
    if task not in TASK_DATA:
        raise UserError(f"unknown task {task!r}: the tasks are {', '.join(sorted(task_names()))}")
    return TASK_DATA[task]


def default_eval_split(task: str) -> str:
    """The split a task's published results are measured on (SQuAD/QED validation, the others test)."""
    return task_data(task).eval_split
