"""`ftpipe serve`: answers through registered versions (the champion unless a request names
another version or alias), records each request, takes feedback on it.

    POST /v1/generate   {"instruction": "...", "input": ""} | {"prompt": "..."} | {"messages": [...]}
                        (+ "model": "champion" | "challenger" | "3", "max_new_tokens": N)
                        -> {"request_id", "answer", "model", "version", "latency_ms"}
    POST /v1/feedback   {"request_id", "kind": "rating", "rating": "up" | "down"}
                        {"request_id", "kind": "correction", "correction": "..."}
                        {"request_id", "kind": "preference", "rejected_id": "..."}   (request_id's answer won)
    POST /invocations   MLflow's scoring protocol ({"dataframe_records": [...]}), recorded too
    GET  /health
    GET  /              the page: chat, compare champion and challenger, feedback, the last gate decision

Generation goes through a bounded queue: a full queue answers 503 with Retry-After (never an
unbounded backlog); prompts waiting together for the same version are generated as one batch.
Bound anywhere but loopback, every request needs serve.token (Bearer, or the ftpipe_token cookie
that opening /?token=... sets). Request bodies over max_body_bytes answer 413.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from ftpipe.serving.records import FeedbackError, Records

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Loaded:
    """A version ready to answer: predict(rows, max_new_tokens) -> answers; prompt(row) -> text."""
    uri: str
    version: str
    predict: Callable[[list[dict], int], list[str]]
    prompt: Callable[[dict], str]


@dataclass
class Job:
    row: dict
    max_new_tokens: int
    done: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """One queue of generation jobs, bounded; a worker takes the first job, waits batch_wait_ms
    for more, and generates every waiting job of the same version and length limit together.
    Jobs of another version keep their place in the queue (first come, first served)."""

    def __init__(self, size: int, max_batch: int, wait_s: float):
        self.jobs: deque[tuple[Loaded, Job]] = deque()
        self.ready: asyncio.Event | None = None
        self.size, self.max_batch, self.wait_s = size, max_batch, wait_s
        self.batches = self.largest = self.generated = 0     # batches run, the largest, prompts generated

    def start(self) -> asyncio.Task:
        self.ready = asyncio.Event()
        return asyncio.get_running_loop().create_task(self._work())

    def room(self) -> int:
        return self.size - len(self.jobs)

    def submit(self, loaded: Loaded, row: dict, max_new_tokens: int) -> asyncio.Future | None:
        """The job's future, or None when the queue is full."""
        if len(self.jobs) >= self.size:
            return None
        fut = asyncio.get_running_loop().create_future()
        self.jobs.append((loaded, Job(row, max_new_tokens, fut)))
        self.ready.set()
        return fut

    async def _work(self) -> None:
        while True:
            while not self.jobs:
                self.ready.clear()
                await self.ready.wait()
            if self.wait_s:
                await asyncio.sleep(self.wait_s)
            first = self.jobs[0]
            batch, kept = [], deque()
            for item in self.jobs:
                same = item[0] is first[0] and item[1].max_new_tokens == first[1].max_new_tokens
                (batch if same and len(batch) < self.max_batch else kept).append(item)
            self.jobs = kept
            batch = [(lo, j) for lo, j in batch if not j.done.done()]    # a waiter gone (client left): skipped
            if not batch:
                continue
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            self.generated += len(batch)
            try:
                answers = await asyncio.to_thread(first[0].predict, [j.row for _, j in batch],
                                                  first[1].max_new_tokens)
                if len(answers) != len(batch):
                    raise RuntimeError(f"the model gave {len(answers)} answers to {len(batch)} prompts")
                for (_, job), answer in zip(batch, answers):
                    if not job.done.done():
                        job.done.set_result(answer)
            except Exception as exc:   # noqa: BLE001 - every waiting request gets the error
                for _, job in batch:
                    if not job.done.done():
                        job.done.set_exception(exc)


def create_app(resolve: Callable[[str], Loaded], records: Records | None, *, queue_size: int = 64,
               max_batch: int = 16, batch_wait_ms: float = 5.0, max_new_tokens: int = 48,
               token: str | None = None, version_exists: Callable[[str], bool] | None = None,
               default_model: str = "champion", max_body_bytes: int = 65536,
               status: Callable[[], dict] | None = None) -> FastAPI:
    """The serving app. resolve(model) -> Loaded (cached by the caller); records: None when
    capture is off; token: required on every request when set; status() -> what the page shows
    of the registry (model, aliases, decision, link)."""
    batcher = Batcher(queue_size, max_batch, batch_wait_ms / 1000)
    page = _page_template()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = batcher.start()
        yield
        worker.cancel()

    app = FastAPI(title="ftpipe serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher = batcher

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if token and request.url.path != "/health":
            offered = request.query_params.get("token") if request.url.path == "/" else None
            if offered is not None and hmac.compare_digest(offered.encode(), token.encode()):
                # the page's link: the token becomes a cookie and leaves the address bar
                done = RedirectResponse("/", 303)
                done.set_cookie("ftpipe_token", token, httponly=True, samesite="strict")
                return done
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
                or request.cookies.get("ftpipe_token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "a token is required (Authorization: Bearer ..., or open "
                                              "/?token=... once in a browser)"}, 401)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
            return JSONResponse({"error": f"the body is over {max_body_bytes} bytes (serve.max_body_bytes)"}, 413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        shown = await asyncio.to_thread(status) if status else {}
        return HTMLResponse(page.render(model=shown.get("model", "ftpipe"), aliases=shown.get("aliases", {}),
                                        decision=shown.get("decision"), link=shown.get("link"),
                                        capture=records is not None))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": len(batcher.jobs), "batches": batcher.batches,
                "largest_batch": batcher.largest, "generated": batcher.generated}

    async def answer(row: dict, model: str, limit: int) -> tuple[dict | None, JSONResponse | None]:
        try:
            loaded = await asyncio.to_thread(resolve, model)
        except LookupError as exc:
            return None, JSONResponse({"error": f"model: {exc}"}, 404)
        start = time.perf_counter()
        fut = batcher.submit(loaded, row, limit)
        if fut is None:
            return None, JSONResponse({"error": "busy: the generation queue is full"}, 503,
                                      headers={"Retry-After": "1"})
        text = await fut
        latency = (time.perf_counter() - start) * 1000
        rid = None
        if records is not None:
            rid = await asyncio.to_thread(records.record, loaded.uri, loaded.version, row, loaded.prompt(row),
                                          text, latency)
        return {"request_id": rid, "answer": text, "model": loaded.uri, "version": loaded.version,
                "latency_ms": round(latency, 1)}, None

    async def _json(request: Request) -> dict | JSONResponse:
        # JSON only: a cross-site form or text/plain post (no CORS preflight) is refused here
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return JSONResponse({"error": "Content-Type must be application/json"}, 415)
        raw = bytearray()
        async for chunk in request.stream():   # a body sent without Content-Length is counted as it comes
            raw += chunk
            if len(raw) > max_body_bytes:
                return JSONResponse({"error": f"the body is over {max_body_bytes} bytes (serve.max_body_bytes)"}, 413)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return JSONResponse({"error": "the body is not JSON"}, 400)
        return body if isinstance(body, dict) else JSONResponse({"error": "the body must be a JSON object"}, 422)

    @app.post("/v1/generate")
    async def generate(request: Request):
        body = await _json(request)
        if isinstance(body, JSONResponse):
            return body
        row, problem = request_row(body)
        if problem:
            return JSONResponse({"error": problem}, 422)
        limit = body.get("max_new_tokens", max_new_tokens)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 4096:
            return JSONResponse({"error": "max_new_tokens: an integer from 1 to 4096"}, 422)
        got, err = await answer(row, str(body.get("model") or default_model), limit)
        return err or got

    @app.post("/invocations")
    async def invocations(request: Request):
        body = await _json(request)
        if isinstance(body, JSONResponse):
            return body
        rows = body.get("dataframe_records") or body.get("inputs")
        if not isinstance(rows, list) or not rows:
            return JSONResponse({"error": "dataframe_records: a non-empty list of rows"}, 422)
        checked = [request_row(r) if isinstance(r, dict) else (None, "each record is an object") for r in rows]
        bad = [f"dataframe_records[{i}]: {p}" for i, (_, p) in enumerate(checked) if p]
        if bad:
            return JSONResponse({"error": "; ".join(bad)}, 422)
        params = body.get("params") or {}
        if not isinstance(params, dict):
            return JSONResponse({"error": "params: an object"}, 422)
        limit = params.get("max_new_tokens", max_new_tokens)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 4096:
            return JSONResponse({"error": "params.max_new_tokens: an integer from 1 to 4096"}, 422)
        if len(checked) > batcher.size:
            return JSONResponse({"error": f"dataframe_records: at most {batcher.size} rows a request "
                                          "(serve.queue_size)"}, 413)
        if len(checked) > batcher.room():      # all or none: never half a request generated and recorded
            return JSONResponse({"error": "busy: the generation queue is full"}, 503, headers={"Retry-After": "1"})
        got = await asyncio.gather(*[answer(r, str(params.get("model") or default_model), limit)
                                     for r, _ in checked])
        for _, err in got:
            if err is not None:
                return err
        return {"predictions": [g["answer"] for g, _ in got], "request_ids": [g["request_id"] for g, _ in got]}

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        if records is None:
            return JSONResponse({"error": "serve.capture is off: no request is recorded to take feedback on"}, 409)
        body = await _json(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            fid = await asyncio.to_thread(
                records.add_feedback, str(body.get("request_id", "")), str(body.get("kind", "")),
                body.get("rating"), body.get("rejected_id"), body.get("correction"), version_exists)
        except FeedbackError as exc:
            return JSONResponse({"error": str(exc)}, exc.status)
        return {"feedback_id": fid}

    return app


def _page_template():
    """The page (static/page.html), every value it shows HTML-escaped by Jinja2; prompts and
    answers only ever reach it as text (textContent) from its script."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("ftpipe.serving", "static"), autoescape=select_autoescape(["html"]))
    return env.get_template("page.html")


def request_row(body: dict[str, Any]) -> tuple[dict | None, str | None]:
    """The data row a request asks about (alpaca instruction/input, a raw prompt, or a
    conversation ending with a user turn), or what is wrong with it."""
    messages = body.get("messages")
    if messages is not None:
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages)):
            return None, "messages: a list of {role: system|user|assistant, content: text}"
        if messages[-1]["role"] != "user":
            return None, "messages: the conversation must end with a user turn"
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}, None
    for key in ("instruction", "prompt"):
        value = body.get(key)
        if isinstance(value, str) and value.strip():
            row = {key: value}
            if key == "instruction":
                extra = body.get("input", "")
                if not isinstance(extra, str):
                    return None, "input: text"
                row["input"] = extra
            return row, None
    return None, "one of instruction, prompt or messages is required (non-empty text)"
