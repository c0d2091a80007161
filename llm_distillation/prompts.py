"""Prompts: one renderer for every task's template (the templates and shot counts are the task catalog's rows,
llm_distillation.datasets.catalog).

The published experiments (ULD, MultiLevelOT) prompt the teacher with a chat template and k examples
(k depends on the task and the teacher family) and the student with a plain 0-shot prompt. Their code
picked k and the title option with `if tokenizer.name_or_path == ...` branches in every loader; here they
are rows of the catalog (`TaskData.teacher_shots`), matched by a lower-case substring of the model name, so a
new teacher family is one line and any other model gets the task's `shots`.

Plain prompt of a question task (the title line only where asked for)::

    Title: {title}
    Context: {context}
    Question: {question}
    Answer:

The answer follows the cue after `PromptSpec.separator` (" " for "Answer:"/"Summary:", "" after the
instruction template's trailing newline). A chat prompt puts the same request, without the cue, in the
user turn; few-shot examples become earlier user/assistant turns and the task's instruction the
system turn (merged into the first user turn when the template has no system role, e.g. Mistral).
"""
from __future__ import annotations

from typing import Optional, Sequence

from llm_distillation.datasets.catalog import INSTRUCTION_PROMPT, PromptSpec, TeacherShots, task_data
from llm_recipes.errors import UserError


# The generic task's other schemas (llm_distillation/datasets/tasks.py normalizes a user's data into one).
GENERIC_SPECS: dict[str, PromptSpec] = {
    "instruction": INSTRUCTION_PROMPT,
    "prompt": PromptSpec(request="{prompt}", cue="", separator=""),
    "text": PromptSpec(request="", cue="", separator=""),
    # messages: rendered by the chat template, or plainly as "role: content" lines (`_plain_messages`)
}


def task_spec(task: str) -> PromptSpec:
    return task_data(task).prompt


def _teacher_row(task: str, model_name: Optional[str]) -> Optional[TeacherShots]:
    name = (model_name or "").lower()
    return next((row for row in task_data(task).teacher_shots if row.pattern in name), None)


def few_shot_count(task: str, model_name: Optional[str], override: Optional[int] = None) -> int:
    """Shots of the teacher prompt: `override` (--dataset.few_shot) if given, else the table's row for the
    teacher's family, else the task's default (the catalog's `shots`)."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 0:
            raise UserError(f"--dataset.few_shot must be a whole number >= 0, got {override!r}")
        return override
    row = _teacher_row(task, model_name)
    return row.shots if row else task_data(task).shots


def prompt_uses_title(task: str, model_name: Optional[str]) -> bool:
    """Whether the published teacher prompt for this model carries the `Title:` line (Mistral on SQuAD/QED)."""
    row = _teacher_row(task, model_name)
    return bool(row and row.title and task_spec(task).title)


# ------------------------------------------------------------------------------------------ rendering
def _spec_for(task: str, example: dict) -> PromptSpec:
    if task != "generic":
        return task_spec(task)
    for schema in ("text", "prompt"):
        if schema in example:
            return GENERIC_SPECS[schema]
    return GENERIC_SPECS["instruction"]


def _request(spec: PromptSpec, example: dict, title: bool) -> str:
    """The example's part of the prompt, without the cue."""
    values = {k: ("" if v is None else v) for k, v in example.items()}
    extras: dict[str, str] = {}
    for name, (slot, text) in spec.optional:
        extras.setdefault(slot, "")
        if str(values.get(name, "")).strip():
            extras[slot] = text.format(**values)
    try:
        text = spec.request.format(**values, **extras)
    except KeyError as missing:
        raise UserError(f"the prompt needs field {missing} but the example has only {', '.join(sorted(example))}: "
                        "load examples with llm_distillation.datasets.tasks.load_examples") from None
    if title and spec.title and str(values.get("title", "")).strip():
        text = f"Title: {values['title']}\n{text}"
    return text


def plain_prompt(task: str, example: dict, *, title: bool = False) -> str:
    """The 0-shot plain prompt (the student's): request, newline, cue."""
    if task == "generic" and "messages" in example:
        return _plain_messages(example["messages"])
    spec = _spec_for(task, example)
    request = _request(spec, example, title)
    if not spec.cue:
        return request
    return f"{request}\n{spec.cue}" if request else spec.cue


def answer_separator(task: str, example: Optional[dict] = None) -> str:
    """What goes between a plain prompt and its answer (" " after "Answer:", "" after a newline).

    A generic prompt/response pair gets " " unless the prompt ends, or the answer starts, with whitespace.
    """
    example = example or {}
    if task == "generic" and "messages" in example:
        return " "
    if task == "generic" and "prompt" in example:
        answers = example.get("answers") or [""]
        prompt_ends = not example["prompt"] or example["prompt"][-1].isspace()
        return "" if prompt_ends or (answers[0][:1].isspace()) else " "
    return _spec_for(task, example).separator


def _plain_messages(messages: Sequence[dict]) -> str:
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines + ["assistant:"])


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat(tokenizer, messages: list[dict]) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.exceptions.TemplateError:
        if not messages or messages[0]["role"] != "system" or len(messages) < 2:
            raise
    # Templates without a system role (Mistral's raise on one): the published prompts put it in the user turn.
    system, first, rest = messages[0], messages[1], messages[2:]
    merged = {"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}
    return tokenizer.apply_chat_template([merged] + rest, tokenize=False, add_generation_prompt=True)


def build_prompt(task: str, example: dict, tokenizer, shots: Sequence[dict] = (), chat: Optional[bool] = None,
                 *, title: bool = False) -> str:
    """The prompt text for one normalized example (see tasks.load_examples), shots first.

    chat=None uses the tokenizer's chat template when it has one; chat=False always gives the plain
    prompt (shots as `prompt + separator + answer`, blank lines between). `title=True` adds the
    `Title:` line where the task has one (see prompt_uses_title); the student never gets it.
    Each shot's answer is its first reference (`shot["answers"][0]`).
    """
    spec = _spec_for(task, example)
    use_chat = has_chat_template(tokenizer) if chat is None else bool(chat)
    if use_chat and not has_chat_template(tokenizer):
        raise UserError(f"chat prompt asked for, but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
                        "chat template: pass chat=None or False")
    if task == "generic" and "text" in example:
        use_chat = False  # plain text: language modelling on the text itself, nothing to prompt
    if use_chat:
        messages = [{"role": "system", "content": spec.system}] if spec.system else []
        for shot in shots:
            messages += _user_turns(task, shot, title) + [{"role": "assistant", "content": _first_answer(shot)}]
        return _chat(tokenizer, messages + _user_turns(task, example, title))
    parts = [plain_prompt(task, shot, title=title) + answer_separator(task, shot) + _first_answer(shot)
             for shot in shots]
    parts.append(plain_prompt(task, example, title=title))
    return "\n\n".join(parts)


def _user_turns(task: str, example: dict, title: bool) -> list[dict]:
    """The example's turns of a chat prompt: its request without the cue (a chat example: its own turns)."""
    if task == "generic" and "messages" in example:
        return [dict(m) for m in example["messages"]]
    request = _request(_spec_for(task, example), example, title).strip()
    return [{"role": "user", "content": request or plain_prompt(task, example, title=title)}]


def _first_answer(example: dict) -> str:
    answers = example.get("answers") or []
    if not answers or not str(answers[0]).strip():
        raise UserError(f"few-shot example {example.get('id')!r} has no answer: shots need a reference answer")
    return str(answers[0])


__all__ = ["GENERIC_SPECS", "task_spec", "few_shot_count", "prompt_uses_title", "plain_prompt", "answer_separator",
           "has_chat_template", "build_prompt"]
