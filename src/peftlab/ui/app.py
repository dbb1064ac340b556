"""The UI's HTTP routes (FastAPI): one static page and a small JSON API over the run folders.

Live metrics are polled (``GET /api/runs/{run}/metrics?since=N`` every 2 s returns the new
lines of metrics.jsonl): the file is the source of truth, a poll is one cheap read of what was
appended, it survives a server restart or a laptop sleep without reconnect logic, and the
browser tests see the same JSON. Server-Sent Events would save a request per 2 s and nothing
a user could see at a logging interval of seconds.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import yaml
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from peftlab.config import ConfigError
from peftlab.errors import describe_error
from peftlab.ui import runs as run_files
from peftlab.ui.chat import ChatService
from peftlab.ui.jobs import JobQueue
from peftlab.ui.schema import form_schema, set_key

STATIC = Path(__file__).parent / "static"
# what a user can fix: a bad config, a missing run or file -> 400 with one line
EXPECTED = (ValueError, KeyError, OSError)


class NewRun(BaseModel):
    name: str
    model: str = ""
    task: str = "sft"
    method: str = "lora"
    values: dict[str, str] = Field(default_factory=dict)  # "train.lr": "3e-4" (YAML values)
    yaml: str = ""  # further keys, as in a config file
    overwrite: bool = False


class ChatRequest(BaseModel):
    run: str
    prompt: str
    max_new_tokens: int = 64
    system: str | None = None


def form_config(req: NewRun) -> dict[str, Any]:
    """The raw config dict of a form: the YAML box first, then the fields on top (each value
    parsed as YAML, as ``--set`` does)."""
    try:
        raw = yaml.safe_load(req.yaml) if req.yaml.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: the top level must be a mapping of keys, got "
                          f"{type(raw).__name__}")
    if req.model.strip():
        raw["model"] = req.model.strip()
    raw["task"] = req.task
    set_key(raw, "method.name", req.method)
    for key, text in req.values.items():
        if text.strip() == "":
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: not a valid value {text!r} ({exc.problem})") from None
        set_key(raw, key, value)
    return raw


def make_app(runs_dir: str | Path, data_dirs: list[Path] | None = None) -> FastAPI:
    root = Path(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    jobs = JobQueue(root)
    chat = ChatService()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        jobs.close()  # a UI that stops leaves no training process behind

    app = FastAPI(title="peftlab ui", lifespan=lifespan)
    app.state.jobs, app.state.root = jobs, root
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ValueError)
    @app.exception_handler(KeyError)
    @app.exception_handler(OSError)
    async def expected_error(request: Request, exc: Exception) -> JSONResponse:
        status = 404 if isinstance(exc, KeyError) else 400
        return JSONResponse({"error": describe_error(exc)}, status_code=status)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/runs")
    def list_runs() -> dict[str, Any]:
        found = [run_files.summary(root, r) for r in run_files.find_runs(root)]
        return {"root": str(root), "runs": found, "jobs": jobs.list()}

    @app.get("/api/runs/{name:path}/detail")
    def run_detail(name: str) -> dict[str, Any]:
        return run_files.summary(root, run_files.resolve_run(root, name), details=True)

    @app.get("/api/runs/{name:path}/metrics")
    def run_metrics(name: str, since: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        run = run_files.resolve_run(root, name)
        records, next_line = run_files.read_metrics(run, since)
        return {"records": records, "next": next_line, "status": run_files.status(run)}

    @app.get("/api/compare")
    def compare(run: Annotated[list[str] | None, Query()] = None) -> dict[str, Any]:
        if not run:
            raise ValueError("compare: pick at least one run")
        paths = {name: run_files.resolve_run(root, name) for name in run}
        summaries = run_files.rank([run_files.summary(root, p) for p in paths.values()])
        return {"runs": summaries,
                "metrics": {name: run_files.read_metrics(p)[0] for name, p in paths.items()}}

    @app.get("/api/schema")
    def schema() -> dict[str, Any]:
        return form_schema(data_dirs or [])

    @app.post("/api/jobs")
    def submit(req: NewRun) -> dict[str, Any]:
        return jobs.submit(form_config(req), req.name.strip(), overwrite=req.overwrite).public()

    @app.post("/api/jobs/{job_id}/stop")
    def stop(job_id: int) -> dict[str, Any]:
        return jobs.stop(job_id).public()

    @app.post("/api/chat")
    async def chat_compare(req: ChatRequest) -> dict[str, Any]:
        run = run_files.resolve_run(root, req.run)
        # loading and generating take seconds: off the event loop, so polling goes on
        replies = await run_in_threadpool(chat.compare, run, req.prompt, req.max_new_tokens,
                                          req.system)
        return {"run": req.run, **replies}

    return app
