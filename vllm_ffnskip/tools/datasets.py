"""The shipped evaluation sets and how prompts and answers are formed from them.

``data/factoid_{calib,test}.jsonl``: short factoid questions with accepted aliases (the calib
split, 212 questions, feeds ``profile``/``calibrate``; ``test``, 123, is held out). ``data/summarization.jsonl``:
short news-style passages with one-sentence reference summaries. Both were written for this
project, so they ship with the package and need no network.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
#: Dense accuracy of the embedded model was highest with this instruction (see
#: docs/results.md): the chat template plus a request for a short answer.
QA_INSTRUCTION = "Answer with just the answer, in a few words."
SUMMARY_INSTRUCTION = "Summarize the following text in one sentence."


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()
    ]


def factoid(split: str) -> list[dict[str, Any]]:
    """Questions of ``split`` ("calib" or "test"): ``{"id", "question", "answers"}``."""
    return load_jsonl(DATA_DIR / f"factoid_{split}.jsonl")


def summarization() -> list[dict[str, Any]]:
    """Passages: ``{"id", "passage", "reference"}``."""
    return load_jsonl(DATA_DIR / "summarization.jsonl")


def chat_prompt(tokenizer: Any, user: str) -> str:
    """One user turn through the model's own chat template (the instruct model's format)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )


def qa_prompts(tokenizer: Any, rows: list[dict[str, Any]]) -> list[str]:
    return [chat_prompt(tokenizer, f"{r['question']} {QA_INSTRUCTION}") for r in rows]


def summary_prompts(tokenizer: Any, rows: list[dict[str, Any]]) -> list[str]:
    return [
        chat_prompt(tokenizer, f"{SUMMARY_INSTRUCTION}\n\n{r['passage']}") for r in rows
    ]


def normalize(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().replace("-", " ")
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_correct(output: str, aliases: list[str]) -> bool:
    """True when a normalised alias occurs as a whole-word span of the normalised output.

    A chat model answers in a phrase ("The capital of France is Paris."), so a strict
    whole-string match would score style, not knowledge; the span match keeps exactness at
    word level and the answers are chosen to be unambiguous.
    """
    padded = f" {normalize(output)} "
    return any(f" {normalize(a)} " in padded for a in aliases if normalize(a))
