"""The embedded default: a date-rewriting instruction dataset and a small text corpus.

Regenerate the committed files (deterministic, fixed seeds):

    python -m ftpipe.defaults

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


def corpus_lines(n: int, seed: int) -> list[str]:
    """Plain English sentences that use month names, written dates and ISO dates.

    The same date never appears in both forms in one line, so pretraining teaches the
    vocabulary, the shapes of both formats and how to copy digits, but not the mapping
    between the formats.
    """
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a = random_date(rng, 1900, 2099)
        b = random_date(rng, 1900, 2099)
        kind = rng.randrange(6)
        subj, verb = rng.choice(CORPUS_SUBJECTS), rng.choice(CORPUS_VERBS)
        if kind == 0:
            line = f"On {words(a)}, {subj.lower() if subj.startswith('A ') else subj} {verb}."
        elif kind == 1:
            line = f"{subj} {verb} in {MONTHS[a.month - 1]} {a.year}. {rng.choice(CORPUS_FILLER)}"
        elif kind == 2:
            line = f"The log entry dated {a.isoformat()} says that {subj.lower()} {verb}."
        elif kind == 3:
            # Repeating a date in the same format teaches copying (induction), which any
            # real pretrained model can already do; never across the two formats.
            line = f"The form dated {a.isoformat()} was stamped again as {a.isoformat()} by {subj.lower()}."
        elif kind == 4:
            line = f"We met on {words(a)}. Yes, {words(a)}, the day {subj.lower()} {verb}."
        else:
            line = (f"Between {words(a)} and the entry of {b.isoformat()}, "
                    f"{subj.lower()} {verb}. {rng.choice(CORPUS_FILLER)}")
        lines.append(line)
    return lines


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_defaults(root: Path) -> None:
    main = date_examples(2400, seed=1, templates=TEMPLATES, start_year=1900, end_year=2099)
    write_jsonl(root / "data/sources/dates.jsonl", main)
    used = {r["output"] for r in main}
    seen_iso = {dt.datetime.strptime(o, "%B %d, %Y").date().isoformat() for o in used}
    drop = date_examples(600, seed=2, templates=TEMPLATES + DROP_TEMPLATES,
                         start_year=1900, end_year=2099, exclude=seen_iso)
    write_jsonl(root / "data/drops/drop-0002.jsonl", drop)
    corpus = root / "data/corpus/corpus.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n".join(corpus_lines(6000, seed=3)) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_defaults(Path.cwd())
    print("wrote data/sources/dates.jsonl, data/drops/drop-0002.jsonl, data/corpus/corpus.txt")
