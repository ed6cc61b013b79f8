"""An OpenAI-compatible HTTP server over the engine: ``slmkit serve MODEL``.

Endpoints (the subset of OpenAI's API that vLLM and most clients use):

- ``POST /v1/completions``: ``prompt`` (text or a list of token ids), ``max_tokens`` (default 16),
  ``temperature`` (default 1.0), ``top_p``, ``stop``, ``seed``, ``stream``;
- ``POST /v1/chat/completions``: ``messages`` through the tokenizer's chat template, the same sampling
  fields, ``max_tokens`` / ``max_completion_tokens`` (default: the rest of the context);
- ``GET /v1/models`` and ``GET /health``.

Beyond OpenAI's fields, requests may set ``top_k``, ``repetition_penalty`` and ``ignore_eos``, and every
choice carries the generated ``token_ids``. ``"stream": true`` answers with server-sent events ending in
``data: [DONE]``. Fields the engine cannot honour (``n`` > 1, ``logprobs``, ``echo``, presence or
frequency penalties) are refused with a 400, never silently ignored.

One thread owns the engine and runs its steps, so all open requests are batched together (continuous
batching); each HTTP request has its own thread and receives its tokens through a queue. A client that
disconnects mid-stream has its request aborted and its cache blocks freed. Standard library only.

Example:
    >>> engine = slmkit.Engine(slmkit.load_model("smollm2-135m"), max_batch_size=16)
    >>> with Server(engine, port=8000) as server:
    ...     server.serve_forever()          # or server.start() to serve from a background thread
"""

from __future__ import annotations

import dataclasses
import json
import queue
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from slmkit.engine.engine import Engine, StreamDelta
from slmkit.engine.sampling import SamplingParams
from slmkit.errors import SlmkitError

MAX_BODY_BYTES = 8 << 20


class RequestError(SlmkitError):
    """A request the server refuses: answered with ``status`` and an OpenAI-style error object."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind

    def body(self) -> dict:
        """The OpenAI-style error object: ``{"error": {"message", "type", "code"}}``."""
        return {"error": {"message": str(self), "type": self.kind, "code": int(self.status)}}


class EngineLoop:
    """Runs the engine on one thread; other threads submit requests and read their deltas from queues.

    The engine is not thread-safe, so every call into it (encoding, adding, aborting, stepping) happens on
    the loop's thread. A request's queue receives its prompt's token count, then :class:`StreamDelta`
    objects until one is finished; or a :class:`RequestError` instead, when the request could not be added
    or the engine failed (the loop then goes on serving the others).
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._outboxes: dict[str, queue.Queue] = {}
        self._thread = threading.Thread(target=self._run, name="slmkit-engine", daemon=True)
        self._thread.start()

    def submit(self, params: SamplingParams, prompt: str | list[int] | None = None,
               messages: list[dict] | None = None, fill_max_tokens: bool = False) -> tuple[str, queue.Queue]:
        """Queue a request (a prompt, or chat ``messages``); returns its id and its queue.

        The queue first receives the prompt's token count (or a :class:`RequestError` when the engine
        refuses the request), then the request's :class:`StreamDelta` objects until one is finished.
        ``fill_max_tokens``: generate up to the rest of the context instead of ``params.max_tokens``.
        """
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        outbox: queue.Queue = queue.Queue()
        self._inbox.put(("add", request_id, prompt, messages, params, fill_max_tokens, outbox))
        return request_id, outbox

    def cancel(self, request_id: str) -> None:
        """Abort a request (a client went away); its cache blocks are freed."""
        self._inbox.put(("abort", request_id))

    def close(self) -> None:
        """Stop the loop thread (open requests are dropped)."""
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)

    def _handle(self, message: tuple) -> bool:
        if message[0] == "stop":
            return False
        if message[0] == "abort":
            self.engine.abort(message[1])
            self._outboxes.pop(message[1], None)
            return True
        _, request_id, prompt, messages, params, fill_max_tokens, outbox = message
        try:
            ids = self.engine.encode_messages(messages) if messages is not None else self.engine.encode(prompt)
            if fill_max_tokens:  # the rest of the context, or of the whole cache when that is smaller
                room = min(self.engine.max_model_len, self.engine.allocator.usable * self.engine.config.block_size)
                params = dataclasses.replace(params, max_tokens=max(1, room - len(ids)))
            self.engine.add_request(ids, params, request_id=request_id)
        except SlmkitError as error:
            outbox.put(RequestError(str(error)))
        except Exception as error:  # noqa: BLE001 - e.g. a tokenizer failure: this request fails, the loop lives
            outbox.put(RequestError(f"could not add the request: {type(error).__name__}: {error}",
                                    HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"))
        else:
            outbox.put(len(ids))
            self._outboxes[request_id] = outbox
        return True

    def _run(self) -> None:
        while True:
            try:
                messages = [self._inbox.get(block=not self.engine.has_unfinished())]
            except queue.Empty:
                messages = []
            while True:
                try:
                    messages.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if not all([self._handle(m) for m in messages]):
                return
            if not self.engine.has_unfinished():
                continue
            try:
                deltas = self.engine.step()
            except Exception as error:  # noqa: BLE001 - the engine failed: tell every waiting request, go on
                for request_id, outbox in list(self._outboxes.items()):
                    outbox.put(RequestError(f"the engine failed: {type(error).__name__}: {error}",
                                            HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"))
                    self.engine.abort(request_id)
                self._outboxes.clear()
                continue
            for delta in deltas:
                outbox = self._outboxes.get(delta.request_id)
                if outbox is not None:
                    outbox.put(delta)
                    if delta.finished:
                        del self._outboxes[delta.request_id]


def _take(outbox: queue.Queue):
    """The next item the loop put in a request's queue; a :class:`RequestError` it put there is raised."""
    item = outbox.get()
    if isinstance(item, Exception):
        raise item
    return item


def _deltas(outbox: queue.Queue) -> Iterator[StreamDelta]:
    while True:
        item = _take(outbox)
        yield item
        if item.finished:
            return


_KINDS = {int: "an integer", float: "a number", bool: "true or false"}


def _field(body: dict, name: str, kind, default=None):
    """``body[name]`` checked against ``kind`` (a JSON null or a missing field is ``default``)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise RequestError(f"'{name}' must be {_KINDS[kind]}, got {json.dumps(value)}")
    return float(value) if kind is float else value


# fields of OpenAI's API the engine cannot honour, with the values that mean "off"
_UNSUPPORTED = {"n": (1,), "best_of": (1,), "logprobs": (False, None), "top_logprobs": (None, 0), "echo": (False,),
                "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",)}


def sampling_params(body: dict, chat: bool) -> tuple[SamplingParams, bool]:
    """OpenAI request fields → (:class:`SamplingParams`, whether to fill the rest of the context).

    Completions default to 16 new tokens (as OpenAI's); chat completions without ``max_tokens`` /
    ``max_completion_tokens`` generate up to the end of the context (as vLLM's).
    """
    for name, off in _UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in off:
            raise RequestError(f"'{name}' is not supported by this server (leave it out, or {json.dumps(off[0])})")
    max_tokens = _field(body, "max_tokens", int)
    if chat:
        max_tokens = _field(body, "max_completion_tokens", int, max_tokens)
    fill = chat and max_tokens is None
    if max_tokens is None:
        max_tokens = 16
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings")
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=_field(body, "temperature", float, 1.0),
            top_p=_field(body, "top_p", float, 1.0), top_k=_field(body, "top_k", int, 0),
            repetition_penalty=_field(body, "repetition_penalty", float, 1.0), stop=stop or [],
            ignore_eos=_field(body, "ignore_eos", bool, False), seed=_field(body, "seed", int))
    except SlmkitError as error:
        raise RequestError(str(error)) from None
    return params, fill


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    server_version = "slmkit"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        if not self.server.quiet:
            super().log_message(format, *args)

    # ---- responses ------------------------------------------------------------------------------------

    def _json(self, status: HTTPStatus, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, error: RequestError) -> None:
        self._json(error.status, error.body())

    def _event(self, data: dict | str) -> None:
        payload = data if isinstance(data, str) else json.dumps(data)
        self.wfile.write(f"data: {payload}\n\n".encode())
        self.wfile.flush()

    # ---- routes ---------------------------------------------------------------------------------------

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/health":
            self._json(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(HTTPStatus.OK, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "slmkit",
                 "max_model_len": self.server.loop.engine.max_model_len}]})
        else:
            self._error(RequestError(f"no such endpoint: GET {self.path}", HTTPStatus.NOT_FOUND, "not_found"))

    def do_POST(self):  # noqa: N802
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        try:
            if self.path not in routes:
                raise RequestError(f"no such endpoint: POST {self.path}", HTTPStatus.NOT_FOUND, "not_found")
            self._complete(self._body(), chat=routes[self.path])
        except RequestError as error:
            self._error(error)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its request was aborted

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("the request needs a Content-Length header", HTTPStatus.LENGTH_REQUIRED) from None
        if length > MAX_BODY_BYTES:
            raise RequestError(f"the request body is over {MAX_BODY_BYTES} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _complete(self, body: dict, chat: bool) -> None:
        model = body.get("model")
        if model not in (None, self.server.model_name):
            raise RequestError(f"the model '{model}' does not exist; this server serves '{self.server.model_name}'",
                               HTTPStatus.NOT_FOUND, "model_not_found")
        params, fill = sampling_params(body, chat)
        stream = _field(body, "stream", bool, False)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("'stream_options' must be an object")
        if chat:
            request_id, outbox = self.server.loop.submit(params, messages=_messages(body.get("messages")),
                                                         fill_max_tokens=fill)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch of one
            if not (isinstance(prompt, str) or isinstance(prompt, list) and prompt
                    and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
                raise RequestError("'prompt' must be a string or a list of token ids (one prompt per request)")
            request_id, outbox = self.server.loop.submit(params, prompt=prompt)
        prompt_tokens = _take(outbox)  # a request the engine refuses is answered here, with a 400
        kind = "chat.completion" if chat else "text_completion"
        base = {"id": request_id, "created": int(time.time()), "model": self.server.model_name}
        if stream:
            self._stream(base, kind, _deltas(outbox), chat, prompt_tokens if options.get("include_usage") else None,
                         request_id)
            return
        text, tokens, finish = "", [], None
        for delta in _deltas(outbox):
            text, finish = text + delta.text, delta.finish_reason
            tokens += delta.token_ids
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": tokens}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        self._json(HTTPStatus.OK, {**base, "object": kind, "choices": [choice],
                                   "usage": _usage(prompt_tokens, len(tokens))})

    def _stream(self, base: dict, kind: str, deltas: Iterator[StreamDelta], chat: bool, usage_prompt: int | None,
                request_id: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        chunk = {**base, "object": kind + ".chunk" if chat else kind}
        tokens = 0
        try:
            if chat:
                self._event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "finish_reason": None}]})
            for delta in deltas:
                tokens += len(delta.token_ids)
                text = {"delta": {"content": delta.text}} if chat else {"text": delta.text, "logprobs": None}
                self._event({**chunk, "choices": [{"index": 0, **text, "token_ids": delta.token_ids,
                                                   "finish_reason": delta.finish_reason if delta.finished else None}]})
            if usage_prompt is not None:
                self._event({**chunk, "choices": [], "usage": _usage(usage_prompt, tokens)})
            self._event("[DONE]")
        except RequestError as error:  # the engine failed mid-stream: the status line is already sent
            self._event(error.body())
        except (BrokenPipeError, ConnectionResetError):
            self.server.loop.cancel(request_id)
            raise


def _messages(messages) -> list[dict[str, str]]:
    """Chat messages as the template takes them: ``content`` a string, or OpenAI's list of text parts joined."""
    shape = "'messages' must be a non-empty list of {\"role\": \"...\", \"content\": \"...\"}"
    if not isinstance(messages, list) or not messages:
        raise RequestError(shape)
    plain = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(shape)
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError("only text content parts ({\"type\": \"text\", \"text\": \"...\"}) are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(shape)
        plain.append({"role": message["role"], "content": content})
    return plain


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, loop: EngineLoop, model_name: str, quiet: bool):
        super().__init__(address, _Handler)
        self.loop, self.model_name, self.quiet = loop, model_name, quiet
        self.created = int(time.time())


def _listen_error(host: str, port: int, error: OSError) -> SlmkitError:
    return SlmkitError(f"cannot listen on {host}:{port}: {error.strerror or error}")


def check_port(port: int, what: str = "port") -> None:
    """Raise a one-line :class:`SlmkitError` unless ``port`` is an int in 0..65535 (0: any free port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise SlmkitError(f"{what} must be in 0..65535, got {port!r}")


def check_listen(host: str, port: int, what: str = "port") -> None:
    """Fail now, with a one-line :class:`SlmkitError`, when ``host:port`` cannot be listened on (a port
    out of range or taken, say): ``slmkit serve`` checks before it spends time loading the model."""
    check_port(port, what)
    try:
        socket.create_server((host, port)).close()
    except OSError as error:
        raise _listen_error(host, port, error) from None


class Server:
    """The OpenAI-compatible server over ``engine``, listening on ``host:port`` (port 0: any free one).

    Use it as a context manager; :meth:`serve_forever` blocks (Ctrl-C to stop), :meth:`start` serves from a
    background thread (for tests and notebooks). ``model_name`` is what ``/v1/models`` lists and requests
    may name (default: the model's source).
    """

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                 quiet: bool = False):
        from slmkit.models.record import get_record

        check_port(port)
        self.model_name = model_name or str(get_record(engine.model).source or engine.model.config._name_or_path
                                            or "model")
        self.loop = EngineLoop(engine)
        try:
            self._http = _HTTPServer((host, port), self.loop, self.model_name, quiet)
        except OSError as error:
            self.loop.close()
            raise _listen_error(host, port, error) from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` the server listens on."""
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`close` (or Ctrl-C in the calling thread)."""
        self._http.serve_forever()

    def start(self) -> "Server":
        """Serve from a background thread; returns self."""
        self._thread = threading.Thread(target=self._http.serve_forever, name="slmkit-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and stop the engine loop."""
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join(timeout=30)
        self._http.server_close()
        self.loop.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
