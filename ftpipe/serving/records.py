"""What serving remembers: every answered request and every piece of feedback on one, in a
real database (SQLite in the project by default, PostgreSQL by URL), and the export that turns
feedback into the next training drop.

    requests   id, created, model (URI asked for), version, row (the request as a data row,
               scrubbed), prompt (as the model saw it, scrubbed), answer (scrubbed), latency_ms
    feedback   id, request_id, created, kind (rating | preference | correction), rating (+1/-1),
               rejected_id (preference: the other answer's request), correction, exported (drop file)

Prompts and answers are scrubbed at capture by the data's PII rules (data.clean.pii: scrub
replaces each span with its placeholder; drop and scrub both keep no PII here). Each write is
its own transaction: concurrent posts never lose one (SQLite in WAL mode with a busy timeout).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from ftpipe.data.pii import scrub_all

META = sa.MetaData()
REQUESTS = sa.Table(
    "requests", META,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("created", sa.Float, nullable=False, index=True),
    sa.Column("model", sa.String(500), nullable=False),
    sa.Column("version", sa.String(50), nullable=False),
    sa.Column("row", sa.Text, nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
)
FEEDBACK = sa.Table(
    "feedback", META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(32), sa.ForeignKey("requests.id"), nullable=False, index=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("rating", sa.Integer),
    sa.Column("rejected_id", sa.String(32), sa.ForeignKey("requests.id")),
    sa.Column("correction", sa.Text),
    sa.Column("exported", sa.String(300), index=True),
)
KINDS = ("rating", "preference", "correction")


class FeedbackError(ValueError):
    """Feedback that cannot be taken: status is the HTTP answer (404, 409, 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def store_url(url: str | None, project: Path) -> str:
    """serve.store with ${VAR}s expanded; null: SQLite at PROJECT/serving/requests.db."""
    if url:
        return os.path.expandvars(url)
    (project / "serving").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(project / 'serving' / 'requests.db').resolve()}"


def open_store(store: str | None, pii_policy: str, project: Path) -> Records | None:
    """The project's serving store, or None when nothing was ever recorded (no store configured
    and no serving/requests.db in the project)."""
    if not store and not (project / "serving" / "requests.db").is_file():
        return None
    return Records.open(store_url(store, project), pii_policy)


def export_drop(store: str | None, pii_policy: str, project: Path) -> tuple[list[Path], dict] | None:
    """`ftpipe feedback export` and the scheduled retrain before collect: the feedback since the
    last export as a drop in PROJECT/data/incoming; None when nothing was ever recorded."""
    records = open_store(store, pii_policy, project)
    return None if records is None else records.export(project / "data" / "incoming")


def scrubber(policy: str) -> Callable[[str], str]:
    """Text as it may be kept: PII replaced by placeholders (policy scrub or drop); keep: as is."""
    from ftpipe.data.pii import scrub

    if policy == "keep":
        return lambda text: text
    return lambda text: scrub(text)[0]


@dataclass
class Records:
    engine: sa.Engine
    scrub: Callable[[str], str]
    keep_pii: bool = False                   # data.clean.pii: keep

    @classmethod
    def open(cls, url: str, pii_policy: str = "scrub") -> Records:
        sqlite = url.startswith("sqlite")
        engine = sa.create_engine(url, connect_args={"timeout": 30} if sqlite else {}, pool_pre_ping=True)
        if sqlite:
            @sa.event.listens_for(engine, "connect")
            def _wal(conn, _record):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=30000")
                conn.execute("PRAGMA foreign_keys=ON")
        META.create_all(engine)
        return cls(engine, scrubber(pii_policy), pii_policy == "keep")

    def record(self, model: str, version: str, row: dict, prompt: str, answer: str, latency_ms: float) -> str:
        """One answered request, scrubbed; returns its id."""
        rid = uuid.uuid4().hex
        clean_row = row if self.keep_pii else scrub_all(row)[0]   # each text on its own, never the JSON of it
        with self.engine.begin() as db:
            db.execute(REQUESTS.insert().values(
                id=rid, created=time.time(), model=model, version=str(version),
                row=json.dumps(clean_row, ensure_ascii=False), prompt=self.scrub(prompt),
                answer=self.scrub(answer), latency_ms=latency_ms))
        return rid

    def request(self, rid: str) -> dict | None:
        with self.engine.connect() as db:
            got = db.execute(REQUESTS.select().where(REQUESTS.c.id == rid)).mappings().first()
        return dict(got) if got else None

    def add_feedback(self, request_id: str, kind: str, rating: str | int | None = None,
                     rejected_id: str | None = None, correction: str | None = None,
                     version_exists: Callable[[str], bool] | None = None) -> int:
        """Validated feedback on a recorded request; returns its id. preference: request_id's
        answer is preferred over rejected_id's (two answers to the same prompt)."""
        if kind not in KINDS:
            raise FeedbackError(422, f"kind: {kind!r} is not one of {', '.join(KINDS)}")
        if rating is not None and not isinstance(rating, (str, int)):
            raise FeedbackError(422, "rating: up or down")
        if correction is not None and not isinstance(correction, str):
            raise FeedbackError(422, "correction: text")
        if rejected_id is not None and not isinstance(rejected_id, str):
            raise FeedbackError(422, "rejected_id: a request id (text)")
        req = self.request(str(request_id))
        if req is None:
            raise FeedbackError(404, f"request_id: no recorded request {request_id!r}")
        if version_exists is not None and not version_exists(req["version"]):
            raise FeedbackError(409, f"request_id: {request_id} was answered by version {req['version']}, "
                                "which the registry no longer holds")
        values: dict = {"request_id": req["id"], "created": time.time(), "kind": kind}
        if kind == "rating":
            score = {"up": 1, "down": -1, 1: 1, -1: -1, "1": 1, "-1": -1}.get(rating)
            if score is None:
                raise FeedbackError(422, f"rating: {rating!r} is not up or down")
            values["rating"] = score
        elif kind == "correction":
            text = (correction or "").strip()
            if not text:
                raise FeedbackError(422, "correction: empty; write the answer the model should have given")
            values["correction"] = self.scrub(correction)
        else:
            other = self.request(str(rejected_id)) if rejected_id else None
            if other is None:
                raise FeedbackError(404 if rejected_id else 422,
                                    f"rejected_id: no recorded request {rejected_id!r}" if rejected_id
                                    else "rejected_id: a preference names the request whose answer lost")
            if other["prompt"] != req["prompt"]:
                raise FeedbackError(422, f"rejected_id: {rejected_id} answered another prompt than {request_id}")
            if other["answer"] == req["answer"]:
                raise FeedbackError(422, "rejected_id: both requests gave the same answer; nothing to prefer")
            values["rejected_id"] = other["id"]
        with self.engine.begin() as db:
            return db.execute(FEEDBACK.insert().values(**values)).inserted_primary_key[0]

    def counts(self) -> dict:
        with self.engine.connect() as db:
            rows = db.execute(sa.select(FEEDBACK.c.kind, sa.func.count()).group_by(FEEDBACK.c.kind)).all()
            n = db.execute(sa.select(sa.func.count()).select_from(REQUESTS)).scalar_one()
        return {"requests": n} | {k: c for k, c in rows}

    def export(self, incoming: Path) -> tuple[list[Path], dict]:
        """Feedback not exported yet, as a drop in `incoming`: corrections as SFT rows, preferences
        as preference pairs, each row with the request ids it came from (`request_ids`), one
        file per format (collection reads one format per file). Ratings stay here (no answer to
        learn from). Returns (the files written, counts)."""
        incoming.mkdir(parents=True, exist_ok=True)
        stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        claim = f"feedback-{stamp}-claim"
        with self.engine.begin() as db:   # claimed in one statement: two exporters never take the same row
            db.execute(FEEDBACK.update().where(FEEDBACK.c.exported.is_(None), FEEDBACK.c.kind != "rating")
                       .values(exported=claim))
        with self.engine.connect() as db:
            pending = db.execute(FEEDBACK.select().where(FEEDBACK.c.exported == claim)
                                 .order_by(FEEDBACK.c.id)).mappings().all()
            asked = {r["id"]: dict(r) for r in db.execute(REQUESTS.select().where(REQUESTS.c.id.in_(
                {f["request_id"] for f in pending} | {f["rejected_id"] for f in pending if f["rejected_id"]})))
                .mappings()}
        counts = {"corrections": sum(f["kind"] == "correction" for f in pending),
                  "preferences": sum(f["kind"] == "preference" for f in pending)}
        groups: dict[str, list[tuple[int, dict]]] = {}
        for f in pending:
            fmt, row = training_row(f, asked)
            groups.setdefault(fmt, []).append((f["id"], row))
        written = []
        try:
            for fmt, items in groups.items():
                path = incoming / f"feedback-{stamp}-{fmt}.jsonl"
                tmp = path.with_suffix(".part")
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in items))
                with self.engine.begin() as db:   # named as the file appears: never exported twice, never lost
                    db.execute(FEEDBACK.update().where(FEEDBACK.c.id.in_([i for i, _ in items]))
                               .values(exported=path.name))
                    tmp.replace(path)
                written.append(path)
        finally:   # whatever was claimed and not written goes back to pending
            with self.engine.begin() as db:
                db.execute(FEEDBACK.update().where(FEEDBACK.c.exported == claim).values(exported=None))
        return written, counts

    def drops_of(self, request_id: str) -> list[str]:
        """The drop files that feedback on this request (as the winner, the loser or the
        corrected one) was exported into."""
        with self.engine.connect() as db:
            got = db.execute(sa.select(FEEDBACK.c.exported).where(
                sa.or_(FEEDBACK.c.request_id == request_id, FEEDBACK.c.rejected_id == request_id),
                FEEDBACK.c.exported.is_not(None)).distinct()).scalars().all()
        return sorted(got)

    def requests_in(self, drop_name: str) -> list[str]:
        """The request ids whose feedback went into this exported drop file."""
        with self.engine.connect() as db:
            got = db.execute(sa.select(FEEDBACK.c.request_id, FEEDBACK.c.rejected_id)
                             .where(FEEDBACK.c.exported == drop_name)).all()
        return sorted({r for pair in got for r in pair if r})


def training_row(feedback: dict, asked: dict[str, dict]) -> tuple[str, dict]:
    """One feedback as a data row and its format: a correction as the request's row with the
    corrected answer (a conversation gains the assistant turn), a preference as a pair (a
    conversation: a chat pair), with the request ids it came from."""
    req = asked[feedback["request_id"]]
    row = json.loads(req["row"])
    if feedback["kind"] == "correction":
        answer, ids = feedback["correction"], {"request_ids": [req["id"]]}
        if row.get("messages"):
            return "chat", {"messages": row["messages"] + [{"role": "assistant", "content": answer}]} | ids
        if row.get("instruction"):
            return "alpaca", {"instruction": row["instruction"], "input": row.get("input", ""), "output": answer} | ids
        return "prompt_completion", {"prompt": req["prompt"], "completion": answer} | ids
    lost = asked[feedback["rejected_id"]]
    pair = {"chosen": req["answer"], "rejected": lost["answer"], "request_ids": [req["id"], lost["id"]]}
    if row.get("messages"):
        return "chat_preference", {"messages": row["messages"]} | pair
    return "preference", {"prompt": req["prompt"]} | pair
