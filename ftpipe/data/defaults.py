"""The embedded default: a date-rewriting instruction dataset and a small text corpus.

Regenerate the committed files (deterministic, fixed seeds):

    python -m ftpipe.data.defaults

Why this task: it has one exact answer per prompt (so exact match means something), a
2M-parameter model learns it on 2 CPU cores in a couple of minutes, and a model that has
not been fine-tuned on it scores 0: it must map a month number to a name, drop a leading
zero from the day and copy the year digit by digit.

    {"instruction": "Convert 1991-03-13 to words.", "input": "", "output": "March 13, 1991"}
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]

# (instruction template, input template); {iso} is the date as YYYY-MM-DD.
TEMPLATES: list[tuple[str, str]] = [
    ("Convert {iso} to words.", ""),
    ("Write the date {iso} in words.", ""),
    ("Rewrite this date in words.", "{iso}"),
    ("How is {iso} written in words?", ""),
]
# The incoming drop adds phrasings the first release never saw.
DROP_TEMPLATES: list[tuple[str, str]] = [
    ("Spell out the date {iso}.", ""),
    ("Give {iso} as a written date.", ""),
]

CORPUS_SUBJECTS = ["The council", "Our team", "The museum", "A small bakery", "The library",
                   "The old bridge", "My grandmother", "The school", "The river port",
                   "A new bookshop", "The orchestra", "The ferry company"]
CORPUS_VERBS = ["opened", "closed", "was renovated", "held a festival", "published a report",
                "changed its name", "welcomed visitors", "moved to a new building",
                "celebrated an anniversary", "announced a plan"]
CORPUS_FILLER = [
    "People in the town still talk about it.",
    "The weather was mild and the streets were busy.",
    "Nobody expected the crowd to be so large.",
    "Records of the day are kept in the archive.",
    "It was a quiet morning until noon.",
    "The newspaper printed a short note about it.",
    "Children played in the square while adults talked.",
    "Many years later the building is still standing.",
]


def words(date: dt.date) -> str:
    """1991-03-13 -> 'March 13, 1991'."""
    return f"{MONTHS[date.month - 1]} {date.day}, {date.year}"


def random_date(rng: random.Random, start_year: int, end_year: int) -> dt.date:
    start = dt.date(start_year, 1, 1).toordinal()
    end = dt.date(end_year, 12, 31).toordinal()
    return dt.date.fromordinal(rng.randint(start, end))


def date_examples(n: int, seed: int, templates: list[tuple[str, str]],
                  start_year: int, end_year: int, exclude: set[str] | None = None) -> list[dict]:
    """n distinct alpaca rows (distinct dates), reproducible from the seed."""
    rng = random.Random(seed)
    seen: set[str] = set(exclude or ())
    rows: list[dict] = []
    while len(rows) < n:
        date = random_date(rng, start_year, end_year)
        iso = date.isoformat()
        if iso in seen:
            continue
        seen.add(iso)
        instruction, inp = rng.choice(templates)
        rows.append({"instruction": instruction.format(iso=iso), "input": inp.format(iso=iso),
                     "output": words(date)})
    return rows


def corpus_texts(n: int, seed: int) -> list[str]:
    """Pretraining documents: plain English sentences with month names, written dates and
    ISO dates, plus instruction-formatted examples of *other* date chores (repeat a date,
    name the next month, pull out the year), as a real base model has seen.

    No document pairs a date's ISO form with its written form, so pretraining teaches the
    vocabulary, the prompt format and how to copy digits, but never the mapping that
    fine-tuning must learn (the base model scores 0 exact match on it).
    """
    from ftpipe.data.formatting import ALPACA_PROMPT

    def chat(instruction: str, answer: str) -> str:
        return ALPACA_PROMPT.format(instruction=instruction) + " " + answer

    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a = random_date(rng, 1900, 2099)
        b = random_date(rng, 1900, 2099)
        kind = rng.randrange(8)
        subj, verb = rng.choice(CORPUS_SUBJECTS), rng.choice(CORPUS_VERBS)
        if kind == 0:
            doc = f"On {words(a)}, {subj.lower() if subj.startswith('A ') else subj} {verb}."
        elif kind == 1:
            doc = f"{subj} {verb} in {MONTHS[a.month - 1]} {a.year}. {rng.choice(CORPUS_FILLER)}"
        elif kind == 2:
            doc = f"The log entry dated {a.isoformat()} says that {subj.lower()} {verb}."
        elif kind == 3:
            doc = (f"Between {words(a)} and the entry of {b.isoformat()}, "
                   f"{subj.lower()} {verb}. {rng.choice(CORPUS_FILLER)}")
        elif kind == 4:
            doc = chat(f"Repeat the date {a.isoformat()} exactly.", a.isoformat())
        elif kind == 5:
            doc = chat(f"Repeat this date in words: {words(a)}.", words(a))
        elif kind == 6:
            doc = chat(f"Which month comes after {MONTHS[a.month - 1]}?", MONTHS[a.month % 12])
        else:
            doc = chat(f"What year is {a.isoformat() if rng.random() < 0.5 else words(a)} in?",
                       str(a.year))
        docs.append(doc)
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_defaults(root: Path) -> None:
    main = date_examples(3000, seed=1, templates=TEMPLATES, start_year=1900, end_year=2099)
    write_jsonl(root / "data/sources/dates.jsonl", main)
    used = {r["output"] for r in main}
    seen_iso = {dt.datetime.strptime(o, "%B %d, %Y").date().isoformat() for o in used}
    drop = date_examples(600, seed=2, templates=TEMPLATES + DROP_TEMPLATES,
                         start_year=1900, end_year=2099, exclude=seen_iso)
    write_jsonl(root / "data/drops/drop-0002.jsonl", drop)
    write_jsonl(root / "data/corpus/corpus.jsonl", [{"text": t} for t in corpus_texts(8000, seed=3)])


if __name__ == "__main__":
    write_defaults(Path.cwd())
    print("wrote data/sources/dates.jsonl, data/drops/drop-0002.jsonl, data/corpus/corpus.jsonl")
