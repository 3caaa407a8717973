"""A scripted local stand-in for the Anthropic Messages API, so the real Claude Code CLI runs offline.

Each session reaches it at its own base URL, http://127.0.0.1:PORT/<session>, and is answered from that
session's script: a list of steps, each answering one request of the model's main loop. Every request body is
recorded, so a test asserts on exactly what the model was shown (tool results, system reminders, hook texts).

    standin = StandIn().start()
    standin.script("alice", [call("check"), end("done")])
    env["ANTHROPIC_BASE_URL"] = standin.base_url("alice")
    ...
    result = standin.tool_result("alice", "check")     # the text the model saw for that call

Steps:
    call(tool, args)   a tool_use block; `tool` is matched against the tools the request advertises (exact, or
                       the last `__` part of an MCP name: "check" finds mcp__ctl__check and mcp__plugin_ctl_ctl__check).
                       A tool the CLI defers behind ToolSearch is first selected with a ToolSearch call.
    say(text)          a text block, then the turn ends (stop_reason end_turn)
    end(text)          the same as say; reads better as a script's last step
    wait(predicate)    hold the answer to the next request until predicate() is true (another session's state,
                       a broker-visible fact): orders two sessions by events, never by sleeps
    run(action)        call action() when the script gets here (pause the room, note the broker's state)
A step may also be any callable(request) -> list of content blocks, for scenarios of their own.

Requests that are not the model's main loop (no tools advertised: titles, summaries, quota probes) are answered
with a short text and recorded as "side" requests; count_tokens answers a token count; anything else gets a
minimal JSON answer and is recorded, so a new endpoint of a newer CLI is visible in the log, not a hang.
Standard library only.
"""
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOOL_SEARCH = "ToolSearch"
WAIT_LIMIT = 60.0           # a wait step that never comes true fails the request instead of hanging the CLI


class ScriptError(Exception):
    """The script cannot answer this request: the stand-in answers an API error and records why."""


# ---------------------------------------------------------------- steps


class Step:
    """One answer of a script; `blocks(request)` returns the assistant's content blocks."""
    def blocks(self, request: "Request") -> list:
        raise NotImplementedError


class Call(Step):
    def __init__(self, tool: str, args=None):
        self.tool, self.args = tool, dict(args or {})

    def blocks(self, request):
        return [request.standin.tool_use(request, request.resolve_tool(self.tool), self.args)]


class Say(Step):
    def __init__(self, text: str):
        self.text = text

    def blocks(self, request):
        return [{"type": "text", "text": self.text}]


class Wait(Step):
    """Not an answer: holds the next step until `predicate()` is true."""
    def __init__(self, predicate, limit=WAIT_LIMIT, label=""):
        self.predicate, self.limit, self.label = predicate, limit, label or getattr(predicate, "__name__", "event")


def call(tool: str, args=None) -> Call:
    return Call(tool, args)


def say(text: str) -> Say:
    return Say(text)


end = say


def wait(predicate, limit=WAIT_LIMIT, label="") -> Wait:
    return Wait(predicate, limit, label)


def run(action, label="") -> Wait:
    """Do something (pause the room, read the broker) when the script reaches this point; answers nothing."""
    return Wait(lambda: action() or True, label=label or getattr(action, "__name__", "action"))


class Callback(Step):
    def __init__(self, function):
        self.function = function

    def blocks(self, request):
        return self.function(request)


# ---------------------------------------------------------------- recorded requests


class Request:
    """One request as the CLI sent it, with helpers to read what the model was shown."""

    def __init__(self, standin, session: str, method: str, path: str, headers: dict, body):
        self.standin, self.session, self.method, self.path, self.headers, self.body = (
            standin, session, method, path, headers, body)
        self.kind = "other"
        self.answer = None          # the content blocks we answered with (main and side requests)
        self.error = None
        self.at = time.monotonic()

    @property
    def tools(self) -> list:
        return [t.get("name", "") for t in (self.body or {}).get("tools", []) if isinstance(t, dict)]

    def resolve_tool(self, wanted: str) -> str:
        names = self.tools
        if wanted in names:
            return wanted
        matches = [n for n in names if n.startswith("mcp__") and n.rsplit("__", 1)[-1] == wanted]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ScriptError(f"tool {wanted!r} is ambiguous among {matches}")
        raise ScriptError(f"tool {wanted!r} is not among the advertised tools {names}")

    def messages(self) -> list:
        return (self.body or {}).get("messages", [])

    def system_text(self) -> str:
        system = (self.body or {}).get("system", "")
        if isinstance(system, str):
            return system
        return "\n".join(b.get("text", "") for b in system if isinstance(b, dict))

    def transcript(self) -> str:
        """Everything in the request the model reads, as one text: system, messages, tool results."""
        return self.system_text() + "\n" + "\n".join(block_text(m.get("content")) for m in self.messages())


def block_text(content) -> str:
    """The text of a message's content (a string, or blocks of text / tool_result / tool_use)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            parts.append(block_text(block.get("content")))
        elif block.get("type") == "tool_use":
            parts.append(json.dumps({"tool_use": block.get("name"), "input": block.get("input")}))
    return "\n".join(parts)


# ---------------------------------------------------------------- the server


class Script:
    def __init__(self, steps):
        self.steps = list(steps)
        self.position = 0
        self.lock = threading.Lock()


class StandIn:
    """The HTTP server, its sessions' scripts and the log of every request."""

    def __init__(self, model="claude-standin"):
        self.model = model
        self.scripts = {}
        self.log = []
        self.changed = threading.Condition()
        self.ids = itertools.count(1)
        self.server = None
        self.thread = None

    # -- lifecycle

    def start(self) -> "StandIn":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                standin.handle(self)

            do_GET = do_PUT = do_DELETE = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def base_url(self, session: str) -> str:
        return f"http://127.0.0.1:{self.port}/{session}"

    def script(self, session: str, steps) -> None:
        self.scripts[session] = Script(steps)

    # -- reading the log

    def requests(self, session=None, kind="main") -> list:
        with self.changed:
            return [r for r in self.log if (session is None or r.session == session) and (kind is None or r.kind == kind)]

    def wait_for(self, predicate, limit=WAIT_LIMIT, label="condition"):
        """Block until predicate(log) is true (re-checked on every request); returns its value."""
        deadline = time.monotonic() + limit
        with self.changed:
            while True:
                value = predicate(self.log)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"stand-in: {label} did not happen within {limit:.0f}s")
                self.changed.wait(min(left, 0.5))

    def tool_uses(self, session: str) -> list:
        """(request, block) for every tool_use we answered with, in order."""
        return [(r, b) for r in self.requests(session) for b in (r.answer or []) if b.get("type") == "tool_use"]

    def tool_result(self, session: str, tool: str, nth=0):
        """The tool_result block the CLI sent back for the nth call of `tool` (resolved name or short name)."""
        uses = [b for _, b in self.tool_uses(session)
                if b["name"] == tool or b["name"].rsplit("__", 1)[-1] == tool]
        if len(uses) <= nth:
            return None
        wanted = uses[nth]["id"]
        for request in self.requests(session):
            for message in request.messages():
                if isinstance(message.get("content"), list):
                    for block in message["content"]:
                        if isinstance(block, dict) and block.get("type") == "tool_result" and block.get("tool_use_id") == wanted:
                            return block
        return None

    # -- answering

    def handle(self, http) -> None:
        path, _, _query = http.path.partition("?")
        session, _, rest = path.lstrip("/").partition("/")
        rest = "/" + rest
        length = int(http.headers.get("content-length") or 0)
        raw = http.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = {"unparsed": raw.decode(errors="replace")}
        request = Request(self, session, http.command, rest, dict(http.headers), body)
        request.kind = "main" if http.command == "POST" and rest == "/v1/messages" and request.tools else request.kind
        with self.changed:                  # logged on arrival: a tool result is visible while its answer waits
            self.log.append(request)
            self.changed.notify_all()
        try:
            if http.command == "POST" and rest == "/v1/messages":
                self.answer_messages(http, request)
            elif rest == "/v1/messages/count_tokens":
                request.kind = "count_tokens"
                self.send_json(http, 200, {"input_tokens": max(1, len(raw) // 4)})
            else:
                self.send_json(http, 200, {})
        except Exception as exc:            # a script's own failure answers an API error, never a dropped connection
            request.error = str(exc) if isinstance(exc, ScriptError) else f"script step failed: {exc!r}"
            self.send_json(http, 400, {"type": "error", "error": {"type": "invalid_request_error", "message": request.error}})
        finally:
            with self.changed:
                self.changed.notify_all()

    def answer_messages(self, http, request: Request) -> None:
        body = request.body or {}
        if not request.tools:
            request.kind = "side"
            blocks = [{"type": "text", "text": "ok"}]
        else:
            request.kind = "main"
            blocks = self.next_blocks(request)
        request.answer = blocks
        stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        message_id = f"msg_standin_{next(self.ids)}"
        if body.get("stream"):
            self.send_stream(http, message_id, blocks, stop_reason)
        else:
            self.send_json(http, 200, {"id": message_id, "type": "message", "role": "assistant", "model": self.model,
                                       "content": blocks, "stop_reason": stop_reason, "stop_sequence": None,
                                       "usage": {"input_tokens": 1, "output_tokens": 1}})

    def next_blocks(self, request: Request) -> list:
        script = self.scripts.get(request.session)
        if script is None:
            raise ScriptError(f"no script for session {request.session!r}")
        with script.lock:
            while True:
                if script.position >= len(script.steps):
                    raise ScriptError(f"session {request.session!r} ran past the end of its script "
                                      f"({len(script.steps)} steps)")
                step = script.steps[script.position]
                if not isinstance(step, Wait):
                    break
                deadline = time.monotonic() + step.limit
                while not step.predicate():
                    if time.monotonic() > deadline:
                        raise ScriptError(f"session {request.session!r}: waited {step.limit:.0f}s for {step.label}")
                    time.sleep(0.05)
                script.position += 1
            step = step if isinstance(step, Step) else Callback(step)
            if isinstance(step, Call):
                deferred = self.deferred_selection(request, step.tool)
                if deferred:
                    return deferred                     # the step itself answers the next request
            script.position += 1
            return step.blocks(request)

    def deferred_selection(self, request: Request, tool: str):
        """A tool the CLI lists as deferred (named in the request, schema not loaded): select it with ToolSearch."""
        try:
            request.resolve_tool(tool)
            return None
        except ScriptError:
            if TOOL_SEARCH not in request.tools:
                raise
        named = set(re.findall(r"\bmcp__[A-Za-z0-9_-]+", request.transcript()))
        found = [n for n in named if n == tool or n.rsplit("__", 1)[-1] == tool] or [tool]
        if len(found) > 1:
            raise ScriptError(f"deferred tool {tool!r} is ambiguous among {sorted(found)}")
        return [self.tool_use(request, TOOL_SEARCH, {"query": f"select:{found[0]}", "max_results": 1})]

    def tool_use(self, request: Request, name: str, args: dict) -> dict:
        return {"type": "tool_use", "id": f"toolu_standin_{next(self.ids):04d}", "name": name, "input": args}

    # -- wire formats

    @staticmethod
    def send_json(http, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        http.send_response(status)
        http.send_header("content-type", "application/json")
        http.send_header("content-length", str(len(data)))
        http.end_headers()
        http.wfile.write(data)

    def send_stream(self, http, message_id: str, blocks: list, stop_reason: str) -> None:
        events = [("message_start", {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}})]
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                start = {"type": "text", "text": ""}
                delta = {"type": "text_delta", "text": block["text"]}
            else:
                start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            events += [("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}),
                       ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}),
                       ("content_block_stop", {"type": "content_block_stop", "index": index})]
        events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                      "usage": {"output_tokens": 1}}),
                   ("message_stop", {"type": "message_stop"})]
        data = b"".join(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode() for name, payload in events)
        http.send_response(200)
        http.send_header("content-type", "text/event-stream")
        http.send_header("cache-control", "no-cache")
        http.send_header("content-length", str(len(data)))
        http.end_headers()
        http.wfile.write(data)
