"""A text generation HTTP server with Megatron-LM's interface (stdlib http.server).

PUT /api with a JSON object::

    {"prompts": ["..."], "tokens_to_generate": 32, "temperature": 1.0,
     "top_k": 0, "top_p": 0.0, "logprobs": false, "random_seed": 1234}

answers ``{"text": [prompt + continuation, ...], "segments": [[token text, ...], ...]}``
plus ``"logprobs"`` (per token after the first) when asked. ``top_k`` = 1 is
greedy. Every request is checked before the model runs: malformed JSON, wrong
types, out-of-range or over-limit values answer HTTP 400 with a message (a
body nested too deeply to parse too, never 500); a body over the size cap
answers 413. Model calls are serialized by a lock, so concurrent requests queue
instead of interleaving their key-value caches; the queue is bounded
(``max_queued``): a request beyond it answers 503 with a ``Retry-After`` header
at once. Each connection has its own thread and a socket timeout, and the listen
backlog (``backlog``) holds a burst of connections until they are accepted, so
a slow client holds up nobody and none is reset.
"""
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from megatron.errors import UserError
from megatron.inference.generation import generate_tokens


@dataclass
class ServerLimits:
    """Request limits (the tool's flags)."""
    max_prompts: int = 8
    max_prompt_tokens: int = 1024
    max_tokens_to_generate: int = 512
    max_body_bytes: int = 1 << 20
    socket_timeout_s: float = 30.0
    max_queued: int = 64       # requests running or waiting for the model; beyond: 503
    backlog: int = 1024        # connections the kernel holds until accepted (listen backlog)
    retry_after_s: int = 1     # the Retry-After of a 503


class RequestError(UserError, ValueError):
    """A request the server refuses with HTTP 400 (one-line message)."""


def _number(body, key, default, lo, hi, integer=False):
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{key} must be {kind}, got {json.dumps(value)}")
    if not (lo <= value <= hi):
        raise RequestError(f"{key}={value} must be in [{lo}, {hi}]")
    return value


def parse_request(raw, tokenizer, limits, max_sequence_length):
    """Validate a request body (bytes); returns a dict of generation settings and token ids."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}") from None
    except RecursionError:  # e.g. 100k levels of "[": the parser's stack, not a server fault
        raise RequestError("request body is not valid JSON: nested too deeply to parse") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    known = {"prompts", "tokens_to_generate", "temperature", "top_k", "top_p", "logprobs",
             "random_seed"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown fields {unknown}; accepted: {sorted(known)}")
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts must be a non-empty list of strings")
    if len(prompts) > limits.max_prompts:
        raise RequestError(f"{len(prompts)} prompts exceed the limit of {limits.max_prompts}")
    n = _number(body, "tokens_to_generate", min(64, limits.max_tokens_to_generate), 0, limits.max_tokens_to_generate, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    if temperature <= 0.0:
        raise RequestError(f"temperature={temperature} must be > 0")
    top_k = _number(body, "top_k", 0, 0, 1000, integer=True)
    top_p = _number(body, "top_p", 0.0, 0.0, 1.0)
    seed = _number(body, "random_seed", 1234, 0, 2 ** 63 - 1, integer=True)
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise RequestError(f"logprobs must be true or false, got {json.dumps(logprobs)}")
    token_lists = []
    for i, p in enumerate(prompts):
        if len(p) > limits.max_prompt_tokens * 64:  # refuse before tokenizing huge text
            raise RequestError(f"prompt {i} is longer than the limit of {limits.max_prompt_tokens} tokens")
        ids = tokenizer.tokenize(p)
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(f"prompt {i} has {len(ids)} tokens, over the limit of "
                               f"{limits.max_prompt_tokens}")
        if max(len(ids), 1) + n > max_sequence_length:
            raise RequestError(f"prompt {i} ({len(ids)} tokens) + tokens_to_generate={n} exceeds "
                               f"the model's {max_sequence_length} positions")
        token_lists.append(ids)
    return {"tokens": token_lists, "tokens_to_generate": n, "temperature": float(temperature),
            "top_k": top_k, "top_p": float(top_p), "logprobs": logprobs, "seed": seed}


class GenerationService:
    """Runs validated requests on one InferenceModel, one at a time."""

    def __init__(self, im, limits=None):
        self.im = im
        self.limits = limits or ServerLimits()
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(self.limits.max_queued)

    def handle(self, raw):
        """The response dict of a raw request body (RequestError for a bad one)."""
        req = parse_request(raw, self.im.tokenizer, self.limits, self.im.max_sequence_length)
        tok = self.im.tokenizer
        out = {"text": [], "segments": []}
        if req["logprobs"]:
            out["logprobs"] = []
        with self.lock:
            for ids in req["tokens"]:
                tokens, lps = generate_tokens(
                    self.im, ids, req["tokens_to_generate"], greedy=req["top_k"] == 1,
                    temperature=req["temperature"], top_k=req["top_k"], top_p=req["top_p"],
                    seed=req["seed"], return_logprobs=req["logprobs"])
                shown = tokens if ids else tokens[1:]  # an empty prompt starts from EOD
                out["text"].append(tok.detokenize(shown))
                out["segments"].append([tok.detokenize([t]) for t in shown])
                if req["logprobs"]:
                    out["logprobs"].append(lps)
        return out


def _handler_class(service):
    limits = service.limits

    class Handler(BaseHTTPRequestHandler):
        """PUT /api; anything else is 404 / 405."""
        timeout = limits.socket_timeout_s  # a silent client cannot hold a thread forever
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep test and tool output quiet
            pass

        def _reply(self, status, obj, headers=()):
            data = json.dumps(obj).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

        def do_PUT(self):
            if self.path.rstrip("/") != "/api":
                return self._reply(404, {"error": f"no endpoint {self.path}; use PUT /api"})
            length = self.headers.get("Content-Length")
            try:
                length = int(length)
            except (TypeError, ValueError):
                return self._reply(411, {"error": "Content-Length header required"})
            if length < 0 or length > limits.max_body_bytes:
                return self._reply(413, {"error": f"request body of {length} bytes exceeds the "
                                                  f"limit of {limits.max_body_bytes}"})
            try:
                raw = self.rfile.read(length)
            except OSError:
                return self.close_connection
            # The body is read first even when the queue is full: closing a socket with
            # unread data would reset the connection instead of answering it.
            if not service.slots.acquire(blocking=False):
                return self._reply(503, {"error": f"server busy: {limits.max_queued} requests "
                                                  f"are queued; retry after "
                                                  f"{limits.retry_after_s} s"},
                                   headers=[("Retry-After", str(limits.retry_after_s))])
            try:
                return self._reply(200, service.handle(raw))
            except (RequestError, ValueError) as e:
                return self._reply(400, {"error": str(e)})
            except Exception as e:  # never let one request take the server down
                return self._reply(500, {"error": f"{type(e).__name__}: {e}"})
            finally:
                service.slots.release()

        def _not_allowed(self):
            self._reply(405, {"error": "use PUT /api with a JSON body"})

        do_GET = do_POST = do_DELETE = do_PATCH = _not_allowed

    return Handler


def make_server(im, host="127.0.0.1", port=5000, limits=None):
    """A ThreadingHTTPServer serving ``im``; call ``serve_forever()`` (port 0 picks a free one)."""
    service = GenerationService(im, limits)

    class Server(ThreadingHTTPServer):
        request_queue_size = service.limits.backlog  # socketserver's default is 5

    server = Server((host, port), _handler_class(service))
    server.daemon_threads = True
    server.service = service
    return server
