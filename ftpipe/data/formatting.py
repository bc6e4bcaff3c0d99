"""Turn a cleaned example into a prompt, a completion and token ids with a loss mask.

The prompt ends without a trailing space and the completion starts with one: that is
how the boundary tokenizes when the model generates after the prompt, so training and
generation see the same tokens.
"""

from __future__ import annotations

from typing import Any

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"


def prompt_of(row: dict[str, Any], tokenizer=None) -> str:
    """The prompt text of a canonical row (see ftpipe.data.records). Chat rows go through the
    tokenizer's chat template, ending with the generation prompt of the assistant turn."""
    fmt = row.get("_format", "alpaca")
    if fmt in ("prompt_completion", "preference"):
        return row.get("prompt") or ""
    if fmt in ("chat", "chat_preference"):
        if tokenizer is None:
            raise ValueError("chat rows need the tokenizer's chat template to render")
        turns = row["messages"] if fmt == "chat_preference" else row["messages"][:-1]
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    instruction = (row.get("instruction") or "").strip()
    inp = (row.get("input") or "").strip()
    if inp:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=inp)
    return ALPACA_PROMPT.format(instruction=instruction)


def request_prompt(row: dict[str, Any], tokenizer) -> str:
    """The text a model continues for a request row (serving, behaviour suites): a conversation
    through its chat template, a raw prompt as written, an instruction (and input) as the
    alpaca prompt the model trained on."""
    if row.get("messages"):
        return tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
    if "prompt" in row:
        return row["prompt"]
    return prompt_of(row)


def completion_of(row: dict[str, Any], tokenizer=None) -> str:
    """What follows the prompt: for chat, exactly what the template adds for the last
    assistant turn (its content and end-of-turn marker); a pair's chosen answer (its rejected
    one through records.rejected_view)."""
    fmt = row.get("_format", "alpaca")
    if fmt == "prompt_completion":
        return row.get("completion") or ""
    if fmt == "preference":
        return row.get("chosen") or ""
    if fmt == "chat_preference":
        prompt = prompt_of(row, tokenizer)
        full = tokenizer.apply_chat_template(row["messages"] + [{"role": "assistant", "content": row["chosen"]}],
                                             tokenize=False)
        return full[len(prompt):] if full.startswith(prompt) else row["chosen"]
    if fmt == "chat":
        prompt = prompt_of(row, tokenizer)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return full[len(prompt):] if full.startswith(prompt) else row["messages"][-1]["content"]
    return " " + (row.get("output") or "").strip()


def answer_of(row: dict[str, Any]) -> str:
    """The expected answer that exact match compares a generation with."""
    from ftpipe.data.records import response_of

    return response_of(row) or ""


def normalize_answer(text: str) -> str:
    """Exact match compares answers with surrounding and repeated whitespace removed."""
    return " ".join((text or "").split())


