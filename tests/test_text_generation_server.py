"""The text generation server over loopback: answers, bad requests (400/404/405/411/413),
a stalled client, concurrent requests; a burst of 200 (200 or 503, none reset), deeply
nested JSON (400) and a client that sends its headers slowly."""
import http.client
import json
import socket
import threading
import time

import pytest
import torch

from tests.helpers.bpe_checkpoint import PROMPT, make_bpe_checkpoint


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from megatron.inference.loader import load_inference_model
    from megatron.inference.server import ServerLimits, make_server
    root = str(tmp_path_factory.mktemp("srv") / "ckpt")
    make_bpe_checkpoint(root)
    im = load_inference_model(root, device=torch.device("cpu"))
    limits = ServerLimits(max_prompts=3, max_prompt_tokens=20, max_tokens_to_generate=16,
                          max_body_bytes=4096, socket_timeout_s=1.0)
    srv = make_server(im, "127.0.0.1", 0, limits)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, im
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def _request(srv, body, method="PUT", path="/api", raw=None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"{}")
    conn.close()
    return out


def test_generates_like_the_library(server):
    from megatron.inference.generation import generate_tokens
    srv, im = server
    status, out = _request(srv, {"prompts": [PROMPT, "And God said"], "tokens_to_generate": 8,
                                 "top_k": 1, "logprobs": True})
    assert status == 200, out
    for text, segs, lps, prompt in zip(out["text"], out["segments"], out["logprobs"],
                                       [PROMPT, "And God said"]):
        ids = im.tokenizer.tokenize(prompt)
        tokens, ref_lps = generate_tokens(im, ids, 8, greedy=True, return_logprobs=True)
        assert text == im.tokenizer.detokenize(tokens) and text.startswith(prompt)
        assert "".join(segs) == text and len(segs) == len(tokens)
        assert len(lps) == len(tokens) - 1 and max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-5
    # sampling is seeded: the library's sampled text for that seed and those settings
    # (not greedy's), the same on every request
    req = {"prompts": [PROMPT], "tokens_to_generate": 8, "temperature": 1.3, "top_p": 0.9,
           "random_seed": 5}
    ids = im.tokenizer.tokenize(PROMPT)
    sampled, _ = generate_tokens(im, ids, 8, temperature=1.3, top_p=0.9, seed=5)
    greedy, _ = generate_tokens(im, ids, 8, greedy=True)
    assert sampled != greedy
    for _ in range(2):
        status, out = _request(srv, req)
        assert status == 200 and out["text"] == [im.tokenizer.detokenize(sampled)], out


@pytest.mark.parametrize("body,needle", [
    ({"prompts": "x"}, "prompts"),
    ({"prompts": []}, "prompts"),
    ({"prompts": [1, 2]}, "prompts"),
    ({"prompts": ["a", "b", "c", "d"]}, "4 prompts exceed"),
    ({"prompts": ["a"], "tokens_to_generate": "5"}, "integer"),
    ({"prompts": ["a"], "tokens_to_generate": True}, "integer"),
    ({"prompts": ["a"], "tokens_to_generate": 2.5}, "integer"),
    ({"prompts": ["a"], "tokens_to_generate": -1}, "tokens_to_generate=-1"),
    ({"prompts": ["a"], "tokens_to_generate": 17}, "tokens_to_generate=17"),
    ({"prompts": ["a"], "temperature": 0}, "temperature"),
    ({"prompts": ["a"], "temperature": "hot"}, "temperature"),
    ({"prompts": ["a"], "top_p": 1.5}, "top_p"),
    ({"prompts": ["a"], "top_k": -3}, "top_k"),
    ({"prompts": ["a"], "logprobs": "yes"}, "logprobs"),
    ({"prompts": ["a"], "bogus": 1}, "unknown fields"),
    ({"prompts": [" word" * 30]}, "over the limit of 20"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_get_400(server, body, needle):
    status, out = _request(server[0], body)
    assert status == 400 and needle in out["error"], out


def test_malformed_and_oversized_and_wrong_method(server):
    srv, _ = server
    status, out = _request(srv, None, raw=b'{"prompts": [')
    assert status == 400 and "not valid JSON" in out["error"]
    status, out = _request(srv, None, raw=b"\xff\xfe")
    assert status == 400
    status, out = _request(srv, None, raw=b" " * 5000)
    assert status == 413 and "4096" in out["error"]
    assert _request(srv, {"prompts": ["a"]}, method="GET")[0] == 405
    assert _request(srv, {"prompts": ["a"]}, method="POST")[0] == 405
    assert _request(srv, {"prompts": ["a"]}, path="/other")[0] == 404
    # no Content-Length: refused, not read until the client gives up
    host, port = srv.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"PUT /api HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 411 " in s.recv(4096).split(b"\r\n")[0] + b" "


def test_stalled_client_does_not_block_others(server):
    srv, _ = server
    host, port = srv.server_address[:2]
    stalled = socket.create_connection((host, port), timeout=10)
    stalled.sendall(b"PUT /api HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
    results = []

    def call():
        results.append(_request(srv, {"prompts": [PROMPT], "tokens_to_generate": 4, "top_k": 1}))
    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3 and all(s == 200 for s, _ in results)
    assert len({json.dumps(o) for _, o in results}) == 1  # the lock keeps requests apart
    stalled.settimeout(10)
    assert stalled.recv(4096) == b""  # the server dropped the stalled request after its timeout
    stalled.close()


@pytest.fixture(scope="module")
def small_queue(server):
    """A second server on the same model: 8 queued requests, a 1 MB body limit."""
    from megatron.inference.server import ServerLimits, make_server
    _, im = server
    limits = ServerLimits(max_prompts=3, max_prompt_tokens=20, max_tokens_to_generate=16,
                          max_body_bytes=1 << 20, socket_timeout_s=5.0, max_queued=8)
    srv = make_server(im, "127.0.0.1", 0, limits)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def test_burst_of_200_each_answered_200_or_503_none_reset(small_queue):
    srv = small_queue
    assert srv.request_queue_size >= 128  # the listen backlog
    host, port = srv.server_address[:2]
    n, queued = 200, srv.service.limits.max_queued
    start = threading.Barrier(n)
    answers = [None] * n

    def call(i):
        try:
            start.wait()
            conn = http.client.HTTPConnection(host, port, timeout=60)
            conn.request("PUT", "/api", body=json.dumps(
                {"prompts": [PROMPT], "tokens_to_generate": 2, "top_k": 1}).encode())
            resp = conn.getresponse()
            answers[i] = (resp.status, resp.getheader("Retry-After"), json.loads(resp.read()))
            conn.close()
        except Exception as e:  # a reset or refused connection: the failure this test is about
            answers[i] = ("error", repr(e), None)
    # Hold the model while the burst arrives: `queued` requests take the queue's
    # places and wait, every other one must be answered 503 at once.
    with srv.service.lock:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while sum(a is not None for a in answers) < n - queued and time.monotonic() < deadline:
            time.sleep(0.05)
    for t in threads:
        t.join(timeout=60)
    errors = [a for a in answers if a is None or a[0] == "error"]
    assert not errors, errors[:3]
    busy = [a for a in answers if a[0] == 503]
    assert len(busy) == n - queued and all(a[1] == "1" and "busy" in a[2]["error"] for a in busy)
    done = [a for a in answers if a[0] == 200]
    assert len(done) == queued and len({json.dumps(a[2]) for a in done}) == 1


@pytest.mark.parametrize("raw", [b"[" * 100_000, b"[" * 50_000 + b"]" * 50_000,
                                 b'{"a": ' * 30_000 + b"1" + b"}" * 30_000])
def test_deeply_nested_json_gets_400_not_500(small_queue, raw):
    status, out = _request(small_queue, None, raw=raw)
    assert status == 400 and "not valid JSON" in out["error"], out


def test_slow_header_client_does_not_hold_up_others(small_queue):
    srv = small_queue
    host, port = srv.server_address[:2]
    header = b"PUT /api HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    stop, sent = threading.Event(), []
    slow = socket.create_connection((host, port), timeout=10)

    def trickle():  # one header byte every 0.5 s (the server's timeout is per read: 5 s)
        for byte in header:
            if stop.wait(0.5):
                return
            slow.sendall(bytes([byte]))
            sent.append(byte)
    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    time.sleep(1.2)  # the slow client is mid-header
    took = []
    for _ in range(4):
        t0 = time.monotonic()
        status, _ = _request(srv, {"prompts": [PROMPT], "tokens_to_generate": 2, "top_k": 1})
        took.append(time.monotonic() - t0)
        assert status == 200
    still_trickling = not stop.is_set() and len(sent) < len(header)
    stop.set()
    trickler.join(timeout=5)
    slow.close()
    assert still_trickling and len(sent) >= 2
    assert max(took) < 3.0, took  # each answered while the slow client was still sending
