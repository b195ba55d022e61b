"""`mxroll serve`: an HTTP server in front of one `Engine`, with sglang's endpoint names and shapes
plus OpenAI's `/v1/completions`.

Generation awaits `Engine.async_generate`, so concurrent requests are batched by the engine's own
loop thread. The weight-sync and control calls block (a distributed update waits while the trainer
broadcasts); they run in worker threads so the event loop keeps accepting and streaming meanwhile.

Auth: two optional bearer tokens, compared in constant time.
- admin token: weight sync (init/update*/destroy), get_weights_by_name, pause/continue, abort,
  flush_cache, memory release/resume. Without one these endpoints are open, so `run_server`
  serves them on a loopback host only (with a warning) and refuses any other host.
- API key: generation and info endpoints (the admin token is accepted there too).
`/health` is always open (load balancers and readiness probes carry no token).

Errors: a malformed body or a bad field is 400 with a message naming it, an engine `ValueError`
(bad sampling params, a rejected weight update) 400, a missing or wrong token 401, a shut-down
engine 503. Generation endpoints answer `{"error": {"message": ...}}`, the others sglang's
`{"success": false, "message": ...}`. A failed request never stops the server.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .chat import ChatTemplate
from .config import EngineConfig
from .engine import Engine, EngineShutdownError
from .intake import SGLANG_FIELDS, check_vocab
from .server_api import (AbortRequest, CompletionFormatter, CompletionRequest, DestroyGroupRequest,
                         DetokenizeRequest, GenerateRequest, GetWeightsRequest, InitGroupRequest, MemoryRequest,
                         ParseFunctionCallRequest, PauseRequest, ProfileRequest, SeparateReasoningRequest,
                         TokenizeRequest, UpdateDiskRequest, UpdateDistributedRequest,
                         UpdateTensorRequest, WeightVersionRequest, check_routed_experts_format, jsonable,
                         routes_base64)
from .metrics import prometheus_text
from .server_chat import ChatCompletionRequest, ChatFormatter
from .reasoning import reasoning_format, split_reasoning
from .tool_calls import split_reply, tool_call_format

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/generate", "/v1/")  # these answer errors in OpenAI's shape
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there


class Unauthorized(Exception):
    pass


def _json(content: Any, status: int = 200) -> Response:
    return Response(json.dumps(jsonable(content)), status_code=status, media_type="application/json")


def _error(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith(GENERATION_PATHS):
        kind = {400: "BadRequestError", 401: "AuthenticationError", 503: "ServiceUnavailableError"}
        body = {"error": {"message": message, "type": kind.get(status, "InternalServerError"), "code": status}}
    else:
        body = {"success": False, "message": message}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """pydantic's errors as one line that names each bad field (union branches folded together)."""
    parts: list[str] = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})"
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_type_tag(x)]
        if err.get("type") == "missing" and not loc:
            return "the request needs a JSON body"
        part = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
        if part not in parts:
            parts.append(part)
    return "invalid request: " + "; ".join(parts[:4])


def _is_type_tag(x) -> bool:
    """pydantic names the branch of a union it tried ("list[int]", "bool") in an error's location."""
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "bool", "float", "none"))


def _token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _new_rids(n_prompts: int | None) -> str | list[str]:
    """Ids the server gives requests that came without one, so that a client that goes away can be aborted."""
    return uuid.uuid4().hex if n_prompts is None else [uuid.uuid4().hex for _ in range(n_prompts)]


def _batch_size(args: dict) -> int | None:
    """Prompts in a batched call, None for a single prompt."""
    p = args.get("prompt")
    if p is not None:
        return len(p) if isinstance(p, list) else None
    ids = args.get("input_ids")
    return len(ids) if ids and isinstance(ids[0], list) else None


def _engine_alive(engine: Engine) -> bool:
    return engine.is_alive()


def create_app(engine: Engine, admin_token: str | None = None, api_key: str | None = None, *,
               owns_engine: bool = False, routed_experts_format: str = "list",
               tool_call_parser: str | None = None, reasoning_parser: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. With owns_engine, the app shuts the engine down when it stops.
    routed_experts_format: how /generate sends `return_routed_experts` — "list", nested JSON lists [tokens][moe
    layers][top_k] (the Engine API's array), or "base64", sglang's encoding (`server_api.routes_base64`) that RL
    frameworks written against sglang decode. tool_call_parser: sglang's name of the tool-call format chat replies
    are parsed with (rollout/tool_calls.py: deepseekv3, deepseekv31, kimi_k2); reasoning_parser: of the reasoning
    format (rollout/reasoning.py: deepseek-r1, deepseek-v3, kimi_k2); None leaves replies as text."""
    check_routed_experts_format(routed_experts_format)
    tool_format, thinking = tool_call_format(tool_call_parser), reasoning_format(reasoning_parser)

    def generate_out(out, req: GenerateRequest):
        """/generate's output with its routes in the server's format."""
        if routed_experts_format == "base64" and req.return_routed_experts:
            out = routes_base64(out, engine.model.moe_layers, engine.model_config.num_hidden_layers)
        return out

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if owns_engine:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="mxroll", lifespan=lifespan)
    served_model = str(engine.model_path)
    started = int(time.time())
    chat_template = ChatTemplate.load(engine.tokenizer_path) if engine.tokenizer is not None else None

    # ---- auth and errors ---------------------------------------------------------------------
    async def admin(request: Request) -> None:
        if admin_token is not None and not _same(_token(request), admin_token):
            raise Unauthorized("this endpoint needs 'Authorization: Bearer <admin token>'")

    async def user(request: Request) -> None:
        if api_key is None:
            return
        given = _token(request)
        if not (_same(given, api_key) or (admin_token is not None and _same(given, admin_token))):
            raise Unauthorized("this endpoint needs 'Authorization: Bearer <API key>'")

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, exc: Unauthorized):
        return _error(request, 401, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message = _validation_message(exc)
        if "json" not in request.headers.get("content-type", "json"):
            message += " (the body is read as JSON only with 'Content-Type: application/json')"
        return _error(request, 400, message)

    @app.exception_handler(EngineShutdownError)
    async def _shut_down(request: Request, exc: EngineShutdownError):
        return _error(request, 503, str(exc))

    @app.exception_handler(ValueError)  # bad requests, rejected weight updates (WeightUpdateError)
    async def _bad_request(request: Request, exc: ValueError):
        return _error(request, 400, str(exc))

    @app.exception_handler(Exception)  # uvicorn still logs the traceback
    async def _internal(request: Request, exc: Exception):
        return _error(request, 500, f"internal error: {exc!r}")

    async def call(fn: Callable, *args, **kwargs):
        """A blocking engine call, in a worker thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def abort_later(rids) -> None:
        """Abort what a departed client asked for, without waiting (callable from a cancelled task)."""
        def run():
            for rid in [rids] if isinstance(rids, str) else rids:
                try:
                    engine.abort_request(rid)
                except Exception:  # noqa: BLE001 - the engine may be shutting down; nothing to tell anyone
                    log.debug("abort of %s after a disconnect failed", rid, exc_info=True)
        threading.Thread(target=run, name="mxroll-abort", daemon=True).start()

    # ---- generation --------------------------------------------------------------------------
    async def until_done(request: Request, args: dict):
        """Await a non-streamed generation; abort it if the client disconnects first."""
        task = asyncio.ensure_future(engine.async_generate(**args))
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client gone; aborting %s", args["rid"])
                abort_later(args["rid"])
                return await task

    async def sse(events: AsyncIterator[dict], rids, render: Callable[[dict], dict | None],
                  tail: Callable[[], list[dict]] = list) -> AsyncIterator[str]:
        """Server-sent events: one `data: {json}` per rendered event, then `data: [DONE]`."""
        complete = False
        try:
            try:
                async for event in events:
                    rendered = render(event)
                    if rendered is not None:
                        yield f"data: {json.dumps(jsonable(rendered))}\n\n"
                for extra in tail():
                    yield f"data: {json.dumps(jsonable(extra))}\n\n"
            except (ValueError, RuntimeError) as e:  # the request failed mid-stream: say so in the stream
                status = 503 if isinstance(e, EngineShutdownError) else 400 if isinstance(e, ValueError) else 500
                yield f"data: {json.dumps({'error': {'message': str(e), 'code': status}})}\n\n"
            complete = True
            yield "data: [DONE]\n\n"
        finally:
            if not complete:  # the client went away (the response task was cancelled)
                abort_later(rids)

    def streamed(body: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.api_route("/generate", methods=["POST", "PUT"], dependencies=[Depends(user)])
    async def generate(req: GenerateRequest, request: Request):
        if (req.text is None) == (req.input_ids is None):
            raise ValueError("pass exactly one of text or input_ids")
        args = dict(prompt=req.text, input_ids=req.input_ids, sampling_params=req.sampling_params,
                    return_logprob=req.return_logprob, top_logprobs_num=req.top_logprobs_num,
                    return_routed_experts=req.return_routed_experts, rid=req.rid,
                    **req.model_dump(include=SGLANG_FIELDS))
        if args["rid"] is None:
            args["rid"] = _new_rids(_batch_size(args))
        if req.stream:
            events = await engine.async_generate(**args, stream=True)  # bad requests raise here: a 400
            return streamed(sse(events, args["rid"], lambda out: generate_out(out, req)))
        return _json(generate_out(await until_done(request, args), req))

    @app.post("/v1/completions", dependencies=[Depends(user)])
    async def completions(req: CompletionRequest, request: Request):
        fmt = CompletionFormatter(req.model or served_model, engine.tokenizer, req.logprobs, req.echo)
        return await openai_reply(req, req.engine_args(), fmt, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(user)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        args = req.engine_args(chat_template, engine.tokenizer, engine.context_length)
        fmt = ChatFormatter(req.model or served_model, engine.tokenizer, req.logprobs, req.top_logprobs, req.stream,
                            req.tool_format(tool_format), req.reasoning_format(thinking))
        return await openai_reply(req, args, fmt, request)

    async def openai_reply(req, args: dict, fmt: CompletionFormatter, request: Request):
        """A completion or chat completion: whole, or streamed as deltas (then usage, when asked)."""
        if "rid" not in args:
            args["rid"] = _new_rids(_batch_size(args))
        if req.stream:
            events = await engine.async_generate(**args, stream=True)
            finals: list[dict] = []

            def render(out: dict) -> dict:
                if out["meta_info"]["finish_reason"] is not None:
                    finals.append(out)
                return fmt.chunk(out)

            usage = req.stream_options is not None and req.stream_options.include_usage
            return streamed(sse(events, args["rid"], render, lambda: [fmt.usage_chunk(finals)] if usage else []))
        out = await until_done(request, args)
        return _json(fmt.response(out if isinstance(out, list) else [out]))

    def tokenizer_for(field: str):
        if engine.tokenizer is None:
            raise ValueError(f"{field}: this engine has no tokenizer")
        return engine.tokenizer

    @app.post("/tokenize", dependencies=[Depends(user)])
    @app.post("/v1/tokenize", dependencies=[Depends(user)])
    async def tokenize(req: TokenizeRequest):
        """The token ids the engine generates from a text prompt (a list of texts: a list of lists)."""
        tokenizer = tokenizer_for("prompt")
        texts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
        ids = [tokenizer.encode(t, add_bos=req.add_special_tokens) for t in texts]
        if isinstance(req.prompt, str):
            return {"tokens": ids[0], "count": len(ids[0]), "max_model_len": engine.context_length}
        return {"tokens": ids, "count": [len(i) for i in ids], "max_model_len": engine.context_length}

    @app.post("/detokenize", dependencies=[Depends(user)])
    @app.post("/v1/detokenize", dependencies=[Depends(user)])
    async def detokenize(req: DetokenizeRequest):
        tokenizer = tokenizer_for("tokens")
        check_vocab(req.tokens, engine.model_config.vocab_size, "tokens")
        return {"text": tokenizer.decode(req.tokens)}

    def model_card() -> dict:  # OpenAI's model object (created: when this server started), sglang's fields
        return {"id": served_model, "object": "model", "created": started, "owned_by": "mxroll", "root": served_model,
                "max_model_len": engine.context_length}

    @app.post("/parse_function_call", dependencies=[Depends(user)])
    async def parse_function_call(req: ParseFunctionCallRequest):
        """sglang's: the tool calls in a reply's text (special tokens kept) by a `--tool-call-parser` format."""
        reply = split_reply(tool_call_format(req.tool_call_parser), engine.tokenizer, None, req.text, final=True)
        names = [(t.get("function") or {}).get("name") for t in req.tools]
        calls = [{"tool_index": names.index(c["function"]["name"]) if c["function"]["name"] in names else -1,
                  "name": c["function"]["name"], "parameters": c["function"]["arguments"]} for c in reply.calls or []]
        return {"normal_text": reply.content, "calls": calls}

    @app.post("/separate_reasoning", dependencies=[Depends(user)])
    async def separate_reasoning(req: SeparateReasoningRequest):
        """sglang's: a reply's reasoning and the text after it, by a `--reasoning-parser` format."""
        fmt = reasoning_format(req.reasoning_parser)
        split = split_reasoning(fmt, fmt.forced, engine.tokenizer, None, req.text, final=True)
        return {"reasoning_text": split.reasoning or "", "text": split.content}

    @app.get("/v1/models", dependencies=[Depends(user)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(user)])
    async def retrieve_model(model: str):
        if model != served_model:
            return JSONResponse({"error": {"message": f"The model '{model}' does not exist (this server serves "
                                                      f"'{served_model}')", "type": "invalid_request_error",
                                           "param": "model", "code": "model_not_found"}}, status_code=404)
        return model_card()

    # ---- health and info ---------------------------------------------------------------------
    @app.get("/metrics", dependencies=[Depends(user)])  # sglang's (its --enable-metrics), always on
    async def metrics():
        info = await call(engine.get_server_info)
        return Response(prometheus_text(info, str(engine.model_path)), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health(request: Request):
        if not _engine_alive(engine):
            return _error(request, 503, "the engine loop is not running")
        return Response(status_code=200)

    @app.get("/health_generate", dependencies=[Depends(user)])
    async def health_generate(request: Request):
        """One greedy token through the engine (waits behind a pause)."""
        await engine.async_generate(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
        return Response(status_code=200)

    def check_alive() -> None:
        if not _engine_alive(engine):
            raise EngineShutdownError("the engine is shut down")

    @app.get("/get_load", dependencies=[Depends(user)])
    async def get_load():
        check_alive()
        return _json(engine.get_load())

    @app.get("/get_model_info", dependencies=[Depends(user)])
    async def get_model_info():
        check_alive()
        return _json(engine.get_model_info())

    @app.get("/get_server_info", dependencies=[Depends(user)])
    @app.get("/server_info", dependencies=[Depends(user)])  # sglang's newer name (RL frameworks discover servers by it)
    async def get_server_info():
        check_alive()
        return _json({**engine.get_server_info(), "admin_token_set": admin_token is not None,
                      "api_key_set": api_key is not None})

    @app.get("/get_weight_version", dependencies=[Depends(user)])
    async def get_weight_version():
        return {"weight_version": engine.weight_version}

    # ---- weight sync (admin) -----------------------------------------------------------------
    def done(result, **extra) -> dict:
        ok, message = result
        return {"success": bool(ok), "message": message, **extra}

    @app.post("/init_weights_update_group", dependencies=[Depends(admin)])
    async def init_weights_update_group(req: InitGroupRequest):
        return done(await call(engine.init_weights_update_group, **req.model_dump()))

    async def update(method: Callable, args: dict) -> dict:
        if args.pop("abort_all_requests"):
            await call(engine.abort_request, abort_all=True)
        return done(await call(method, **args), weight_version=engine.weight_version)

    @app.post("/update_weights_from_distributed", dependencies=[Depends(admin)])
    async def update_weights_from_distributed(req: UpdateDistributedRequest):
        return await update(engine.update_weights_from_distributed, req.model_dump())

    @app.post("/update_weights_from_tensor", dependencies=[Depends(admin)])
    async def update_weights_from_tensor(req: UpdateTensorRequest):
        args = req.model_dump()
        tensors = args.pop("serialized_named_tensors")
        if isinstance(tensors, list):
            if len(tensors) != 1:
                raise ValueError(f"serialized_named_tensors: got {len(tensors)} payloads (one per tensor-parallel "
                                 "rank); this engine runs one rank, so send one")
            tensors = tensors[0]
        return await update(engine.update_weights_from_tensor, {"named_tensors": tensors, **args})

    @app.post("/update_weights_from_disk", dependencies=[Depends(admin)])
    async def update_weights_from_disk(req: UpdateDiskRequest):
        return await update(engine.update_weights_from_disk, req.model_dump())

    @app.post("/destroy_weights_update_group", dependencies=[Depends(admin)])
    async def destroy_weights_update_group(req: DestroyGroupRequest | None = None):
        return done(await call(engine.destroy_weights_update_group, **(req or DestroyGroupRequest()).model_dump()))

    @app.post("/update_weight_version", dependencies=[Depends(admin)])
    async def update_weight_version(req: WeightVersionRequest):
        return done(await call(engine.update_weight_version, req.new_version, req.abort_all_requests),
                    new_version=engine.weight_version)

    async def body_or_query(request: Request, model: type, lists: tuple[str, ...] = ()):
        """The request of one of sglang's GET-or-POST endpoints: its JSON body when it has one, else its query
        string (`?name=...&truncate_size=2`; repeated keys for the list fields `lists`), validated by `model`."""
        raw = await request.body()
        if raw.strip():
            return model.model_validate_json(raw)
        q = request.query_params
        data = {k: (q.getlist(k) if k in lists else q[k]) for k in q.keys()}
        return model.model_validate(data, strict=False)  # query values arrive as strings

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"], dependencies=[Depends(admin)])
    async def get_weights_by_name(request: Request):
        req = await body_or_query(request, GetWeightsRequest)
        return _json(await call(engine.get_weights_by_name, req.name, req.truncate_size))

    # ---- controls (admin) --------------------------------------------------------------------
    @app.post("/pause_generation", dependencies=[Depends(admin)])
    async def pause_generation(req: PauseRequest | None = None):
        mode = (req or PauseRequest()).mode
        await call(engine.pause_generation, mode)
        return {"success": True, "message": f"generation paused (mode={mode})"}

    @app.post("/continue_generation", dependencies=[Depends(admin)])
    async def continue_generation():
        await call(engine.continue_generation)
        return {"success": True, "message": "generation continued"}

    @app.api_route("/flush_cache", methods=["GET", "POST"], dependencies=[Depends(admin)])
    async def flush_cache():
        ok = await call(engine.flush_cache)
        return {"success": bool(ok), "message": "cache flushed" if ok else "cache not flushed"}

    @app.api_route("/freeze_gc", methods=["GET", "POST"], dependencies=[Depends(admin)])
    async def freeze_gc():
        await call(engine.freeze_gc)
        return Response("Garbage collection frozen.\n", media_type="text/plain")  # sglang's reply

    @app.api_route("/start_profile", methods=["GET", "POST"], dependencies=[Depends(admin)])
    async def start_profile(req: ProfileRequest | None = None):
        await call(engine.start_profile, **(req or ProfileRequest()).model_dump())
        return Response("Start profiling.\n", media_type="text/plain")  # sglang's reply

    @app.api_route("/stop_profile", methods=["GET", "POST"], dependencies=[Depends(admin)])
    async def stop_profile():
        path = await call(engine.stop_profile)
        return Response(f"Stop profiling. Trace: {path}\n", media_type="text/plain")

    @app.post("/abort_request", dependencies=[Depends(admin)])
    async def abort_request(req: AbortRequest | None = None):
        req = req or AbortRequest()
        if not req.rid and not req.abort_all:
            raise ValueError("pass rid or abort_all=true")
        await call(engine.abort_request, req.rid, req.abort_all)
        return {"success": True, "message": "aborted all requests" if req.abort_all else f"aborted {req.rid!r}"}

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"], dependencies=[Depends(admin)])
    async def release_memory_occupation(request: Request):
        tags = (await body_or_query(request, MemoryRequest, lists=("tags",))).tags
        await call(engine.release_memory_occupation, tags)
        return {"success": True, "message": f"released {tags or 'all'}"}

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"], dependencies=[Depends(admin)])
    async def resume_memory_occupation(request: Request):
        tags = (await body_or_query(request, MemoryRequest, lists=("tags",))).tags
        await call(engine.resume_memory_occupation, tags)
        return {"success": True, "message": f"resumed {tags or 'all'}"}

    return app


# ---- running it ---------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, admin_token: str | None, api_key: str | None) -> None:
    """Refuse a reachable server whose admin endpoints are open; warn about what stays open."""
    if admin_token is None:
        if not is_loopback(host):
            raise ValueError(f"host {host!r} is not a loopback address and no admin token is set: anyone who "
                             "can reach it could replace the weights. Pass --admin-token (or set "
                             "MXROLL_ADMIN_TOKEN), or serve on 127.0.0.1")
        log.warning("no admin token: weight-sync and control endpoints are open to every local process "
                    "on %s (set --admin-token or MXROLL_ADMIN_TOKEN to require one)", host)
    if api_key is None and not is_loopback(host):
        log.warning("no API key: generation endpoints on %s are open to anyone who can reach it", host)


class BackgroundServer:
    """A uvicorn server on its own thread (tests, or an RL loop that hosts the engine in-process).
    port=0 picks a free port; `url` says which."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level.lower(), access_log=False,
                                                    timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="mxroll-http", daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._thread.is_alive():
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError(f"the HTTP server did not start on {self.url}")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join()
        self._sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run_server(engine_config: EngineConfig | dict, host: str = "127.0.0.1", port: int = 30000,
               admin_token: str | None = None, api_key: str | None = None, log_level: str = "INFO",
               routed_experts_format: str = "list", tool_call_parser: str | None = None,
               reasoning_parser: str | None = None) -> None:
    """Load the engine, serve it until interrupted (Ctrl-C / SIGTERM), then shut the engine down."""
    import uvicorn

    check_exposure(host, admin_token, api_key)  # before the model loads: a refused start costs nothing
    check_routed_experts_format(routed_experts_format)  # before the model loads, as the exposure check
    tool_call_format(tool_call_parser), reasoning_format(reasoning_parser)
    engine = Engine(engine_config)
    try:
        app = create_app(engine, admin_token=admin_token, api_key=api_key, owns_engine=True,
                         routed_experts_format=routed_experts_format, tool_call_parser=tool_call_parser,
                         reasoning_parser=reasoning_parser)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                                               access_log=log_level.upper() == "DEBUG", timeout_graceful_shutdown=5))
        log.info("serving %s on http://%s:%d", engine.model_path, host, port)
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
    finally:
        engine.shutdown()
