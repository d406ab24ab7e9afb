"""HttpBackend against a scripted fake OpenAI-compatible server on 127.0.0.1 (no other network).

Each test queues the replies the server gives per path (status, headers, body, delay); when a path's
queue is empty the server answers 404, so an unexpected extra request fails loudly. The server
records every request it saw (path, headers, JSON body) for the tests to check.

The probe of how the server tokenizes "10" (http.TEN_PROBE_PROMPT) is answered by the server itself,
from the tokens it is given, and counted in `probes`, not in `requests`: it is a fact about the
server's tokenizer, not part of what a test scripts. The toy model further down tokenizes any text,
with "10" as one token or, like Llama-2 and Mistral, as "1" "0".
"""

from __future__ import annotations

import itertools
import json
import re
import math
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from eval.explain import http as http_module
from eval.explain.explainers import Explanation
from eval.explain.http import DIGITS, TEN_PROBE_PROMPT, HttpBackend, HttpError
from eval.explain.prompts import UNKNOWN, simulator_prompt
from eval.explain.simulators import LLMSimulator

MODEL = "test-model"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@dataclass
class Reply:
    """One scripted answer. `body` may be a dict (sent as JSON), raw text, or a function of the
    request's JSON body returning either; `delay` seconds pass before anything is sent."""

    status: int = 200
    body: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class SeenRequest:
    path: str
    headers: Message  # looked up case-insensitively: urllib sends "Content-type"
    body: Any


class FakeServer:
    """A ThreadingHTTPServer on 127.0.0.1:<free port> answering POSTs from per-path reply queues.

    `probe_tokens`: how its tokenizer splits TEN_PROBE_PROMPT (default: "10" is one token).
    """

    def __init__(self, probe_tokens: list[str] | None = None):
        self._replies: dict[str, deque[Reply]] = defaultdict(deque)
        self._always: dict[str, Reply] = {}
        self._lock = threading.Lock()
        self.requests: list[SeenRequest] = []
        self.probe_tokens = probe_tokens or ["word", "\t", "10", "\n"]
        assert "".join(self.probe_tokens) == TEN_PROBE_PROMPT
        self.probes = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def queue(self, path: str, *replies: Reply) -> None:
        """Answers the next requests to `path` with `replies`, in order."""
        with self._lock:
            self._replies[path].extend(replies)

    def always(self, path: str, reply: Reply) -> None:
        """Answers every request to `path` with `reply` once its queue is empty."""
        with self._lock:
            self._always[path] = reply

    def count(self, path: str | None = None) -> int:
        """How many requests (to `path`, or in all) the server has seen."""
        with self._lock:
            return sum(1 for seen in self.requests if path is None or seen.path == path)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next_reply(self, seen: SeenRequest) -> Reply:
        with self._lock:
            if seen.path == COMPLETIONS and seen.body.get("prompt") == TEN_PROBE_PROMPT:
                self.probes += 1
                top_logprobs = [None] + [{token: -0.1} for token in self.probe_tokens[1:]]
                return Reply(body=echo_reply(self.probe_tokens, top_logprobs))
            self.requests.append(seen)
            if self._replies[seen.path]:
                return self._replies[seen.path].popleft()
            return self._always.get(seen.path, Reply(404, {"error": f"nothing scripted for {seen.path}"}))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the name http.server looks for)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request_body = json.loads(raw)
                reply = server._next_reply(SeenRequest(self.path, self.headers, request_body))
                threading.Event().wait(reply.delay)  # not time.sleep: some tests patch that
                body = reply.body(request_body) if callable(reply.body) else reply.body
                payload = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the timeout test)

            def log_message(self, format, *args):
                pass  # keep the test output clean

        return Handler


@pytest.fixture
def local_only(monkeypatch):
    """No proxy from the environment in the way of 127.0.0.1, and no real API key sent to it."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def server(local_only):
    fake = FakeServer()
    yield fake
    fake.close()


def make_backend(server: FakeServer, **overrides) -> HttpBackend:
    settings = dict(model=MODEL, timeout=5.0, max_retries=2, backoff=0.01)
    settings.update(overrides)
    return HttpBackend(server.base_url + "/", **settings)  # the trailing slash is stripped


# ------------------------------------------------------------------------------------- replies


def echo_reply(tokens: list[str], top_logprobs: list[dict[str, float] | None]) -> dict[str, Any]:
    """A /completions reply with echo, max_tokens 1 and logprobs, as vLLM and OpenAI shape it."""
    offsets = list(itertools.accumulate((len(token) for token in tokens), initial=0))[:-1]
    token_logprobs = [None] + [-1.0] * (len(tokens) - 1)
    return {
        "id": "cmpl-test",
        "object": "text_completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "text": "".join(tokens),
                "finish_reason": "length",
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": token_logprobs,
                    "top_logprobs": top_logprobs,
                    "text_offset": offsets,
                },
            }
        ],
    }


def chat_reply(content: str | Callable[[Any], str]) -> Any:
    """A /chat/completions reply with `content`, or a function of the request giving it."""

    def reply(request: Any) -> dict[str, Any]:
        text = content(request) if callable(content) else content
        message = {"role": "assistant", "content": text}
        return {"id": "chatcmpl-test", "object": "chat.completion", "model": MODEL,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip

    return reply if callable(content) else reply(None)


def manual_softmax(logprobs: dict[str, float]) -> list[float]:
    """P(0..10) from the digit keys of `logprobs`, renormalised over the digits present."""
    weights = [math.exp(logprobs[digit]) if digit in logprobs else 0.0 for digit in DIGITS]
    return [weight / sum(weights) for weight in weights]


# A simulator prompt in the "all at once" style: every activation is the placeholder "unknown".
PROMPT_LINES = ["<start>\n", "foo\tunknown\n", "bar\tunknown\n", " baz\tunknown\n", "<end>\n"]
PROMPT = "".join(PROMPT_LINES)
SLOTS = [index for index in range(len(PROMPT)) if PROMPT.startswith("unknown", index)]
# How a tokenizer might split it: tabs and newlines alone and merged with neighbours.
PROMPT_TOKENS = [
    "<", "start", ">\n",
    "foo", "\t", "unknown", "\n",
    "bar\t", "unknown", "\n",
    " baz", "\t", "unknown", "\n",
    "<", "end", ">\n",
]  # fmt: skip
# Slot 1: every digit, plus " 5" (a leading space: not the digit "5") and other tokens.
SLOT_1 = {str(value): -0.2 * value - 0.5 for value in range(11)} | {" 5": -0.1, "unknown": -4.0}
# Slot 2: only some digits made the top logprobs; the others get probability 0.
SLOT_2 = {"0": -2.5, "3": -0.7, "7": -1.1, "10": -3.0, "foo": -0.3, "\n": -2.0}
# Slot 3: "10" is not among the top logprobs: value 10 gets probability 0.
SLOT_3 = {"1": -0.4, "0": -1.6, "2": -2.2, "\t": -3.0}


def prompt_top_logprobs(slot_entries: list[dict[str, float]]) -> list[dict[str, float] | None]:
    """Top logprobs for PROMPT_TOKENS: `slot_entries` at the "unknown" tokens, and at the other
    tokens entries that hold digits too, so that reading the wrong index gives a wrong answer."""
    entries: list[dict[str, float] | None] = [None]  # the first token has no context
    slot_entries = iter(slot_entries)
    for position, token in enumerate(PROMPT_TOKENS[1:], start=1):
        if token == "unknown":
            entries.append(next(slot_entries))
        else:
            entries.append({token: -0.05, "9": -3.0 - 0.1 * position, "2": -4.0})
    return entries


# ------------------------------------------------------------------------------------------ tests


def test_digit_distributions_reads_the_slots_and_renormalises(server):
    assert [PROMPT[offset - 1] for offset in SLOTS] == ["\t", "\t", "\t"]  # three slots, after tabs
    reply = echo_reply(PROMPT_TOKENS, prompt_top_logprobs([SLOT_1, SLOT_2, SLOT_3]))
    server.queue(COMPLETIONS, Reply(body=reply))
    backend = make_backend(server, top_logprobs=15)

    distributions = backend.digit_distributions(PROMPT, SLOTS)

    assert len(distributions) == 3
    for distribution, expected in zip(distributions, [SLOT_1, SLOT_2, SLOT_3]):
        assert len(distribution) == 11
        assert sum(distribution) == pytest.approx(1.0)
        assert distribution == pytest.approx(manual_softmax(expected), abs=1e-12)
    assert [distributions[1][value] for value in (1, 2, 4, 5, 6, 8, 9)] == [0.0] * 7
    assert distributions[2][10] == 0.0 and distributions[2][1] == max(distributions[2])
    # One request, shaped for echo scoring, after the one probe of how "10" is tokenized.
    assert server.probes == 1
    assert server.count() == 1
    assert server.requests[0].path == COMPLETIONS
    assert server.requests[0].body == {
        "model": MODEL, "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 15, "temperature": 0,
    }  # fmt: skip


def test_a_500_then_a_200_succeeds_after_one_retry(server):
    server.queue(CHAT, Reply(500, {"error": "overloaded"}), Reply(body=chat_reply("fine")))
    assert make_backend(server).generate("hello") == "fine"
    assert server.count(CHAT) == 2


def test_a_429_with_retry_after_is_retried_after_the_servers_wait(server):
    server.queue(CHAT, Reply(429, {"error": "slow down"}, {"Retry-After": "0"}), Reply(body=chat_reply("ok")))
    backend = make_backend(server, backoff=5.0)  # Retry-After 0 replaces the 5 s backoff
    start = time.perf_counter()
    assert backend.generate("hello") == "ok"
    assert time.perf_counter() - start < 2.0
    assert server.count(CHAT) == 2


def test_waits_back_off_exponentially_and_are_capped(server, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(http_module.time, "sleep", waits.append)
    server.queue(
        CHAT,
        Reply(502), Reply(503), Reply(500),
        Reply(503, headers={"Retry-After": "1000"}),
        Reply(body=chat_reply("done")),
    )  # fmt: skip
    assert make_backend(server, backoff=0.5, max_retries=5).generate("hi") == "done"
    assert waits == [0.5, 1.0, 2.0, 30.0]
    assert server.count(CHAT) == 5


def test_a_5xx_every_time_raises_after_the_retries(server):
    server.always(CHAT, Reply(503, {"error": "down for maintenance"}))
    with pytest.raises(HttpError, match="503") as raised:
        make_backend(server, max_retries=3).generate("hello")
    assert "down for maintenance" in str(raised.value) and CHAT in str(raised.value)
    assert server.count(CHAT) == 4  # the first attempt and 3 retries


def test_a_reply_slower_than_the_timeout_raises_and_returns_nothing(server):
    reply = echo_reply(PROMPT_TOKENS, prompt_top_logprobs([SLOT_1] * 3))
    server.always(COMPLETIONS, Reply(body=reply, delay=1.0))
    backend = make_backend(server, timeout=0.2, max_retries=1)
    start = time.perf_counter()
    with pytest.raises(HttpError, match="timed out after 0.2 s"):
        backend.digit_distributions(PROMPT, SLOTS)
    assert time.perf_counter() - start < 0.9  # two 0.2 s attempts, not the server's 1 s
    assert server.count(COMPLETIONS) == 2


def test_a_refused_connection_is_retried_then_raises(local_only):
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = HttpBackend(f"http://127.0.0.1:{port}/v1", MODEL, max_retries=2, backoff=0.01)
    with pytest.raises(HttpError, match="failed after 3 attempt.*connection error"):
        backend.generate("hello")


def test_malformed_json_every_time_raises_after_the_retries(server):
    server.always(COMPLETIONS, Reply(body='{"choices": [ this is not json'))
    with pytest.raises(HttpError, match="malformed"):
        make_backend(server, max_retries=2).digit_distributions(PROMPT, SLOTS)
    assert server.count(COMPLETIONS) == 3


def test_malformed_once_then_good_succeeds(server):
    good = echo_reply(PROMPT_TOKENS, prompt_top_logprobs([SLOT_1, SLOT_2, SLOT_3]))
    server.queue(COMPLETIONS, Reply(body="<html>502 Bad Gateway</html>"), Reply(body=good))
    distributions = make_backend(server).digit_distributions(PROMPT, SLOTS)
    assert distributions[0] == pytest.approx(manual_softmax(SLOT_1))
    assert server.count(COMPLETIONS) == 2


@pytest.mark.parametrize(
    "reply",
    [
        {"choices": []},
        {"choices": [{"text": PROMPT}]},  # no logprobs: the server ignored echo/logprobs
        echo_reply(PROMPT_TOKENS, prompt_top_logprobs([SLOT_1] * 3)[:-1]),  # lists of unequal length
    ],
    ids=["no-choices", "no-logprobs", "unequal-lengths"],
)
def test_valid_json_without_the_expected_fields_is_malformed(server, reply):
    server.always(COMPLETIONS, Reply(body=reply))
    with pytest.raises(HttpError, match="malformed"):
        make_backend(server, max_retries=1).digit_distributions(PROMPT, SLOTS)
    assert server.count(COMPLETIONS) == 2


@pytest.mark.parametrize("status", [400, 401])
def test_other_4xx_fail_at_once_without_the_api_key(server, monkeypatch, status):
    secret = "sk-test-7f3a9c1e5b2d-do-not-leak"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    # Some servers echo a rejected key back in their error body.
    server.always(COMPLETIONS, Reply(status, {"error": f"Incorrect API key provided: {secret}"}))
    backend = make_backend(server, max_retries=5)

    with pytest.raises(HttpError) as raised:
        backend.digit_distributions(PROMPT, SLOTS)

    message = str(raised.value)
    assert str(status) in message and COMPLETIONS in message and "Incorrect API key" in message
    assert secret not in message and secret not in repr(raised.value)
    assert secret not in repr(backend) and secret not in backend.name
    assert server.count(COMPLETIONS) == 1
    assert server.requests[0].headers["Authorization"] == f"Bearer {secret}"


def test_no_authorization_header_without_a_key(server):
    server.queue(CHAT, Reply(body=chat_reply("ok")))
    make_backend(server).generate("hello")
    assert "Authorization" not in server.requests[0].headers


def test_a_slot_inside_a_token_raises_naming_the_offset(server):
    # The tokenizer merged the tab before the second slot with it: "\tunknown" is one token.
    tokens = ["<", "start", ">\n", "foo", "\t", "unknown", "\n", "bar", "\tunknown", "\n",
              " baz", "\t", "unknown", "\n", "<", "end", ">\n"]  # fmt: skip
    assert "".join(tokens) == PROMPT
    entries = [None] + [{"5": -0.1}] * (len(tokens) - 1)
    server.queue(COMPLETIONS, Reply(body=echo_reply(tokens, entries)))
    with pytest.raises(ValueError, match=f"no token of the prompt starts at slot offset {SLOTS[1]}"):
        make_backend(server).digit_distributions(PROMPT, SLOTS)


def test_no_digit_among_the_top_logprobs_raises(server):
    no_digits = {"unknown": -0.1, " 3": -1.0, "10%": -2.0}  # near misses do not count
    reply = echo_reply(PROMPT_TOKENS, prompt_top_logprobs([SLOT_1, no_digits, SLOT_3]))
    server.queue(COMPLETIONS, Reply(body=reply))
    with pytest.raises(ValueError, match=f"slot offset {SLOTS[1]}: raise top_logprobs"):
        make_backend(server).digit_distributions(PROMPT, SLOTS)


def test_a_slot_at_the_first_token_has_no_distribution(server):
    tokens = ["unknown", "\n"]
    server.queue(COMPLETIONS, Reply(body=echo_reply(tokens, [None, {"3": -0.1}])))
    with pytest.raises(ValueError, match="slot offset 0"):
        make_backend(server).digit_distributions("unknown\n", [0])


def test_cache_reuses_replies_and_skips_failures(server, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    reply = echo_reply(PROMPT_TOKENS, prompt_top_logprobs([SLOT_1, SLOT_2, SLOT_3]))
    server.always(COMPLETIONS, Reply(body=reply))
    monkeypatch.setenv("OPENAI_API_KEY", "first-key")
    first = make_backend(server, cache_dir=cache).digit_distributions(PROMPT, SLOTS)
    assert server.count() == 1

    # A rerun (new backend, another key: not part of the cache key) reads the file.
    monkeypatch.setenv("OPENAI_API_KEY", "rotated-key")
    backend = make_backend(server, cache_dir=cache)
    assert backend.digit_distributions(PROMPT, SLOTS) == first
    assert server.count() == 1 and server.probes == 1  # the probe's reply is cached too
    assert {path.suffix for path in cache.iterdir()} == {".json"}  # no temporary file left behind

    # Another prompt (the same tokens, one more space at the end) is another request.
    backend.digit_distributions(PROMPT + " ", SLOTS)
    assert server.count() == 2

    # A failure is not cached: the same request, once the server is well, is asked again.
    server.queue(CHAT, Reply(400, {"error": "bad request"}))
    with pytest.raises(HttpError, match="400"):
        backend.generate("explain this")
    server.queue(CHAT, Reply(body=chat_reply("an explanation")))
    assert backend.generate("explain this") == "an explanation"
    assert backend.generate("explain this") == "an explanation"
    assert server.count(CHAT) == 2
    assert len(list(cache.iterdir())) == 4  # the probe, two prompts, one chat


def test_generate_posts_the_prompt_as_the_user_message(server):
    server.queue(CHAT, Reply(body=chat_reply("tokens about cooking")))
    text = make_backend(server).generate("Explain this latent.", max_tokens=32, stop=["\n\n"])
    assert text == "tokens about cooking"
    seen = server.requests[0]
    assert seen.path == CHAT and seen.headers["Content-Type"] == "application/json"
    assert seen.body == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Explain this latent."}],
        "max_tokens": 32,
        "temperature": 0,
        "stop": ["\n\n"],
    }


def test_map_runs_concurrently_and_keeps_order(server):
    def echo_prompt(request: Any) -> str:
        return request["messages"][0]["content"].upper()

    server.always(CHAT, Reply(body=chat_reply(echo_prompt), delay=0.3))
    backend = make_backend(server, concurrency=4)
    prompts = ["one", "two", "three", "four"]
    start = time.perf_counter()
    results = backend.map(backend.generate, prompts)
    elapsed = time.perf_counter() - start
    assert results == ["ONE", "TWO", "THREE", "FOUR"]
    assert elapsed < 0.9, f"4 requests of 0.3 s took {elapsed:.2f} s: not concurrent"
    assert server.count(CHAT) == 4


def test_map_propagates_exceptions_and_handles_no_items(server):
    backend = make_backend(server)

    def fail_on_two(item: int) -> int:
        if item == 2:
            raise KeyError(item)
        return item * 10

    assert backend.map(fail_on_two, [0, 1, 3]) == [0, 10, 30]
    with pytest.raises(KeyError):
        backend.map(fail_on_two, range(5))
    assert backend.map(fail_on_two, []) == []


def test_name_and_constructor_checks(server):
    backend = make_backend(server)
    assert backend.name == f"http:{MODEL}@{server.base_url}"
    with pytest.raises(ValueError, match="concurrency"):
        HttpBackend(server.base_url, MODEL, concurrency=0)


# ------------------------------------------------------------------ the value 10 as one token or two
#
# A toy model behind the fake server: it tokenizes any text (digits one by one, like Llama-2 and
# Mistral, or with "10" as one token) and has beliefs about the value at each slot. The exact
# reference of a slot is the expected value of those beliefs, renormalised over 0..10: what an
# exact reader gets under either tokenization, and what the local backend computes.

# P(value) at a slot, by the token on the slot's line; the rest of the mass goes to non-values.
# "foo": 90% sure of 10 (a reader that counts the "1" of "10" as 1 makes that about 1).
SLOT_BELIEFS = {
    "foo": {10: 0.90, 1: 0.02, 0: 0.05, 2: 0.03},
    "bar": {10: 0.20, 1: 0.40, 0: 0.25, 7: 0.05},
    " baz": {10: 0.05, 1: 0.10, 0: 0.60, 4: 0.15},
}
OTHER_SLOT_BELIEFS = {10: 0.10, 1: 0.10, 0: 0.80}  # slots of other tokens (the few-shot examples)
NON_VALUE_TOKENS = {UNKNOWN: 0.7, " ": 0.3}  # shares of the mass that is no value


def toy_tokenize(text: str, splits_ten: bool) -> list[str]:
    """Words (with a leading space), single whitespace characters and other characters, and digits
    one by one, except "10" as one token unless `splits_ten`."""
    pattern = r"\d| ?[A-Za-z]+|\s|." if splits_ten else r"10|\d| ?[A-Za-z]+|\s|."
    return re.findall(pattern, text)


def toy_value_beliefs(context: str) -> dict[int, float]:
    """P(value) at the slot that `context` ends at (its last line is "token<TAB>"), summing to 0.9.

    Each "unknown" before the slot moves a tenth of what is left of P(10) to P(1), so that P("0"
    after "1") read in any other context than the prompt before the slot (e.g. with "1" written in
    every slot at once) gives another P(10).
    """
    beliefs = dict(SLOT_BELIEFS.get(context.rsplit("\n", 1)[-1][:-1], OTHER_SLOT_BELIEFS))
    moved = beliefs[10] * (1 - 0.9 ** context.count(UNKNOWN))
    beliefs[10] -= moved
    beliefs[1] += moved
    return {value: 0.9 * p for value, p in beliefs.items()}


def toy_next_token_probabilities(context: str, splits_ten: bool) -> dict[str, float]:
    """The toy model's P(next token | context): at a slot, the values (through "1" where "10" is
    split); after a "1" written in a slot, "0" for 10 or an end of line for 1; elsewhere a mix that
    has a digit too, so that reading the wrong position gives a wrong answer."""
    line = context.rsplit("\n", 1)[-1]
    if line.endswith("\t"):
        beliefs = toy_value_beliefs(context)
        probabilities = {str(value): p for value, p in beliefs.items()}
        if splits_ten:
            probabilities["1"] += probabilities.pop("10")
        non_value = 1 - sum(beliefs.values())
        return probabilities | {token: share * non_value for token, share in NON_VALUE_TOKENS.items()}
    if splits_ten and line.endswith("\t1"):
        beliefs = toy_value_beliefs(context[:-1])
        zero = beliefs[10] / (beliefs[1] + beliefs[10])
        return {"0": zero, "\n": 0.75 * (1 - zero), "5": 0.25 * (1 - zero)}
    return {UNKNOWN: 0.6, "\n": 0.3, "9": 0.1}


def toy_completions(splits_ten: bool) -> Callable[[Any], dict[str, Any]]:
    """A /completions reply function of the toy model: any prompt or list of prompts, with or
    without echo, one generated token (the most likely), `logprobs` top logprobs per token."""

    def top(context: str, k: int) -> dict[str, float]:
        ranked = sorted(toy_next_token_probabilities(context, splits_ten).items(), key=lambda item: -item[1])
        return {token: math.log(p) for token, p in ranked[:k]}

    def choice(index: int, prompt: str, request: Any) -> dict[str, Any]:
        next_token = max(toy_next_token_probabilities(prompt, splits_ten).items(), key=lambda item: item[1])[0]
        tokens = toy_tokenize(prompt, splits_ten) + [next_token] if request.get("echo") else [next_token]
        first_offset = 0 if request.get("echo") else len(prompt)
        offsets = list(itertools.accumulate((len(token) for token in tokens), initial=first_offset))[:-1]
        contexts = [prompt[:offset] for offset in offsets]
        top_logprobs = [top(context, request["logprobs"]) if context else None for context in contexts]
        token_logprobs = [
            # Tokens the toy model does not name get a tiny probability; none of them is read.
            math.log(toy_next_token_probabilities(context, splits_ten).get(token, 1e-9)) if context else None
            for context, token in zip(contexts, tokens)
        ]
        logprobs = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                    "text_offset": offsets}  # fmt: skip
        return {"index": index, "text": next_token, "logprobs": logprobs, "finish_reason": "length"}

    def reply(request: Any) -> dict[str, Any]:
        prompts = request["prompt"] if isinstance(request["prompt"], list) else [request["prompt"]]
        choices = [choice(index, prompt, request) for index, prompt in enumerate(prompts)]
        # Nothing promises choices in prompt order (each has its index): check the client sorts them.
        return {"id": "cmpl-toy", "object": "text_completion", "model": MODEL, "choices": choices[::-1]}

    return reply


@pytest.fixture(params=[True, False], ids=["ten-split", "ten-one-token"])
def toy_server(request, local_only):
    """A fake server answering /completions from the toy model; `.splits_ten` says how it tokenizes."""
    splits_ten = request.param
    fake = FakeServer(probe_tokens=toy_tokenize(TEN_PROBE_PROMPT, splits_ten))
    fake.splits_ten = splits_ten
    fake.always(COMPLETIONS, Reply(body=toy_completions(splits_ten)))
    yield fake
    fake.close()


def exact_distribution(context: str) -> list[float]:
    """The toy model's beliefs at the slot `context` ends at, renormalised over the values 0..10."""
    beliefs = toy_value_beliefs(context)
    return [beliefs.get(value, 0.0) / sum(beliefs.values()) for value in range(11)]


def test_the_toy_tokenizer_writes_ten_as_one_token_or_two():
    assert toy_tokenize(TEN_PROBE_PROMPT, splits_ten=True) == ["word", "\t", "1", "0", "\n"]
    assert toy_tokenize(TEN_PROBE_PROMPT, splits_ten=False) == ["word", "\t", "10", "\n"]


def test_digit_distributions_are_exact_whether_ten_is_one_token_or_two(toy_server):
    distributions = make_backend(toy_server).digit_distributions(PROMPT, SLOTS)

    expected = [exact_distribution(PROMPT[:offset]) for offset in SLOTS]
    assert distributions == [pytest.approx(distribution, abs=1e-12) for distribution in expected]
    assert distributions[0][10] == pytest.approx(0.90)  # "foo", before any "unknown": 90% sure of 10
    assert toy_server.probes == 1
    prompts = [seen.body["prompt"] for seen in toy_server.requests]
    if toy_server.splits_ten:  # then one more request: the model's next token after each slot's "1"
        assert prompts == [PROMPT, [PROMPT[:offset] + "1" for offset in SLOTS]]
        assert "echo" not in toy_server.requests[1].body
    else:
        assert prompts == [PROMPT]


def test_a_server_90_percent_sure_of_10_simulates_about_9_under_either_tokenization(toy_server):
    # Bills et al. 2023's all-at-once simulation, end to end: the expected value at each slot.
    tokens = ["foo", "bar", " baz"]
    explanation = Explanation(text="the word foo")
    prompt, slots = simulator_prompt(explanation.text, tokens)

    (predicted,) = LLMSimulator(make_backend(toy_server)).simulate(explanation, [tokens])

    reference = [sum(value * p for value, p in enumerate(exact_distribution(prompt[:offset]))) for offset in slots]
    assert predicted == pytest.approx(reference, abs=1e-9)
    assert predicted[0] == pytest.approx(0.02 + 0.06 + 9.0)  # not the 0.98 of reading "1" as 1


def test_p10_is_p1_times_p0_after_1_and_a_0_outside_the_top_logprobs_counts_as_0(local_only):
    server = FakeServer(probe_tokens=["word", "\t", "1", "0", "\n"])
    try:
        slot_1 = {"1": math.log(0.6), "0": math.log(0.3), "unknown": math.log(0.1)}
        slot_2 = {"1": math.log(0.5), "3": math.log(0.25)}
        slot_3 = {"1": math.log(0.2), "0": math.log(0.8)}
        server.queue(COMPLETIONS, Reply(body=echo_reply(PROMPT_TOKENS, prompt_top_logprobs([slot_1, slot_2, slot_3]))))
        after_one = [{"0": math.log(0.75), "\n": math.log(0.25)}, {"0": -math.inf, "\n": -0.01},
                     {"\n": -0.1, "5": -2.5}]  # fmt: skip
        choices = [{"index": index, "text": "\n", "logprobs": {"tokens": ["\n"], "token_logprobs": [-0.1],
                    "top_logprobs": [top], "text_offset": [offset + 1]}}
                   for index, (top, offset) in enumerate(zip(after_one, SLOTS))]  # fmt: skip
        server.queue(COMPLETIONS, Reply(body={"choices": choices}))

        distributions = make_backend(server).digit_distributions(PROMPT, SLOTS)

        # P(10) = P("1") * P("0" | "1"), P(1) = P("1") * (1 - P("0" | "1")), then over 0..10.
        assert distributions[0] == pytest.approx([0.3 / 0.9, 0.15 / 0.9] + [0.0] * 8 + [0.45 / 0.9])
        assert distributions[1] == pytest.approx([0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75] + [0.0] * 7)
        assert distributions[2] == pytest.approx([0.8, 0.2] + [0.0] * 9)
    finally:
        server.close()


@pytest.mark.parametrize(
    "probe_tokens", [["word", "\t1", "0", "\n"], ["word", "\t", "10\n"], ["word", "\t", "1", "0\n"]],
    ids=["tab-merged-with-1", "10-merged-with-newline", "0-merged-with-newline"],
)
def test_a_tokenization_of_ten_that_is_neither_one_token_nor_1_0_raises_naming_the_model(local_only, probe_tokens):
    server = FakeServer(probe_tokens=probe_tokens)
    try:
        with pytest.raises(ValueError, match=f"{MODEL}: .*neither the one token \"10\" nor \"1\" \"0\""):
            make_backend(server).digit_distributions(PROMPT, SLOTS)
        assert server.count() == 0  # refused before asking anything it could not read
    finally:
        server.close()


def test_the_probe_is_made_once_per_backend_even_under_concurrency(toy_server, tmp_path):
    backend = make_backend(toy_server, concurrency=4, cache_dir=tmp_path)
    # Six excerpts that differ before their slots, so that no two requests are the same (one
    # would then be answered from the cache of the other, or not, depending on timing).
    def distributions_of_shifted_prompt(shift: int) -> list[list[float]]:
        return backend.digit_distributions(" " * shift + PROMPT, [offset + shift for offset in SLOTS])

    shifts = range(6)
    backend.map(distributions_of_shifted_prompt, shifts)
    assert toy_server.probes == 1
    make_backend(toy_server, cache_dir=tmp_path).digit_distributions(PROMPT, SLOTS)  # a rerun: all cached
    assert toy_server.probes == 1
    assert toy_server.count() == len(shifts) * (2 if toy_server.splits_ten else 1)


def test_a_continuation_reply_missing_a_choice_is_malformed(local_only):
    server = FakeServer(probe_tokens=["word", "\t", "1", "0", "\n"])
    try:
        server.queue(COMPLETIONS, Reply(body=echo_reply(PROMPT_TOKENS, prompt_top_logprobs([SLOT_3] * 3))))
        one_choice = {"index": 0, "text": "\n", "logprobs": {"tokens": ["\n"], "top_logprobs": [{"0": -1.0}]}}
        server.always(COMPLETIONS, Reply(body={"choices": [one_choice]}))
        with pytest.raises(HttpError, match=r"malformed.*3 prompts but choices with indices \[0\]"):
            make_backend(server, max_retries=1).digit_distributions(PROMPT, SLOTS)
    finally:
        server.close()
