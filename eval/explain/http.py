"""An OpenAI-compatible HTTP backend for the explain -> simulate -> score pipeline.

    backend = HttpBackend("http://127.0.0.1:8000/v1", model="meta-llama/Llama-3.1-8B-Instruct")
    explanation = backend.generate(explainer_prompt, max_tokens=64)
    distributions = backend.digit_distributions(simulator_prompt, slot_offsets)   # 11 floats per slot

The explainer writes free text through `/chat/completions`. The simulator (Bills et al. 2023, "all at
once") writes a prompt in which every activation is the placeholder "unknown"; one `/completions`
request with `echo` (and `max_tokens: 1`: some servers refuse 0; the one generated token comes after
the prompt and is ignored) makes the server score the prompt itself, and the top
logprobs of the token at each placeholder give the model's distribution over the values "0".."10".

Detection and fuzzing (Paulo et al. 2024; eval/explain/classifiers.py) read yes/no answers at their slots
the same way, one echo request per batch of excerpts (`answer_distributions`).

Tokenizers that split digits (Llama-2, Mistral) write the value 10 as two tokens, "1" "0", so the
token at a placeholder cannot tell 1 from 10. Once per backend, a probe request (TEN_PROBE_PROMPT,
echoed) shows how the server's own tokenizer writes "10" in a slot. When it is two tokens, a second
request per excerpt asks for the model's next token after each slot's "1", and P(10) = P("1") *
P("0" | .., "1"), exactly as the local backend (eval/explain/backends.py) computes it.

Every request is retried on what is usually transient (429, 5xx, dropped connections, timeouts and
malformed replies) with exponential backoff, and fails at once on other 4xx. Nothing is ever turned
into a silent zero: a request that fails for good raises `HttpError`, a reply that cannot answer the
question raises `ValueError`. With `cache_dir` every well-formed reply is kept on disk, so a rerun of
the same experiment makes no requests. Only the standard library is used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

DIGITS = [str(value) for value in range(11)]
"""The tokens a simulator may predict at a placeholder: "0".."10"; index = activation value."""

MAX_SLEEP_S = 30.0
"""No single wait between retries is longer, whatever the backoff or a Retry-After header asks."""

BODY_EXCERPT_CHARS = 200
"""How much of a failed reply's body goes into an error message: enough to read the server's reason."""

TEN_PROBE_PROMPT = "word\t10\n"
"""A simulator prompt's line with the value 10 in its slot (after the tab). Echoed once per backend, it
shows whether the server's tokenizer writes "10" as one token or as "1" "0"."""

TEN_PROBE_OFFSET = TEN_PROBE_PROMPT.index("10")
"""Where the value starts in TEN_PROBE_PROMPT: a token must begin there, as at every slot."""

Item = TypeVar("Item")
Result = TypeVar("Result")


class HttpError(RuntimeError):
    """A request that failed for good: a non-retryable status, or every retry used up.

    The message names the URL path, the HTTP status (or the connection problem) and a short excerpt
    of the reply's body. It never contains the API key.
    """


class _Retryable(Exception):
    """A failed attempt worth retrying; `wait_s` is the server's Retry-After, when it gave one."""

    def __init__(self, problem: str, wait_s: float | None = None):
        super().__init__(problem)
        self.wait_s = wait_s


class HttpBackend:
    """Client of an OpenAI-compatible server (vLLM, llama.cpp, OpenAI ...) at `base_url`.

    `concurrency` bounds both `map`'s workers and the requests in flight from this object, so
    several callers sharing one backend still never flood the server. Thread-safe.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        cache_dir: str | Path | None = None,
        top_logprobs: int = 20,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, got {max_retries}")
        if top_logprobs < 1:
            raise ValueError(f"top_logprobs must be at least 1, got {top_logprobs}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.top_logprobs = top_logprobs
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.name = f"http:{model}@{self.base_url}"
        # Read once, kept private, and kept out of __repr__, messages and cache keys.
        self._api_key = os.environ.get(api_key_env) or None
        self._in_flight = threading.BoundedSemaphore(concurrency)
        # How the server writes "10": None until the first digit_distributions call probes it; the
        # lock makes concurrent first calls wait for that one probe instead of each sending one.
        self._ten_is_one_token: bool | None = None
        self._ten_probe_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HttpBackend({self.name!r})"

    # ----------------------------------------------------------------------------------- public API

    def generate(self, prompt: str, max_tokens: int = 64, stop: list[str] | None = None) -> str:
        """Explanation text: POST {base_url}/chat/completions with one user message = prompt,
        temperature 0; returns choices[0].message.content."""
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if stop:
            payload["stop"] = list(stop)
        reply = self._request("/chat/completions", payload, _check_chat_reply)
        return reply["choices"][0]["message"]["content"]

    def digit_distributions(self, prompt: str, slot_offsets: list[int]) -> list[list[float]]:
        """For each character offset in `slot_offsets` (where a token of the prompt must begin), the
        model's probabilities of the value written there being 0..10, renormalised over those 11:
        a list (one per slot) of 11 floats summing to 1, index = value.

        One POST {base_url}/completions with echo and max_tokens 1: the server scores the prompt
        itself, and `top_logprobs[i]` of its reply is the distribution of token i given the tokens
        before it, so the entry of the token that starts at a slot is what the model expected there.
        Keys are matched exactly against "0".."10" (" 5" is not "5"). A value missing from the top
        logprobs gets probability 0.

        Where the server's tokenizer writes "10" as "1" "0" (probed once, see TEN_PROBE_PROMPT),
        the "1" at a slot starts both 1 and 10. A second request then gives, for every slot,
        z = P("0" | prompt up to the slot, "1"), and the slot's "1" is shared out as P(10) =
        P("1") * z and P(1) = P("1") * (1 - z), before the renormalisation, as the local backend
        does. A "0" missing from the top logprobs after the "1" gets probability 0, like any value
        missing at the slot.

        Raises ValueError naming the slot's offset when no token starts there (the server's
        tokenizer merged the slot with the text before it), when no value is among its top logprobs
        (raise `top_logprobs`), or when the entry there is missing or not a dict of numbers; and
        naming the model when its tokenizer writes "10" neither as one token nor as "1" "0". A
        reply without the lists it must have is malformed: it is retried like a failed request and,
        if it stays so, raises HttpError.
        """
        if not slot_offsets:
            return []
        ten_is_one_token = self._server_writes_ten_as_one_token()
        logprobs = self._echo_logprobs(prompt)
        # With "10" split, no token "10" exists: the value 10 is read through the "1".
        value_tokens = DIGITS if ten_is_one_token else DIGITS[:10]
        slot_weights = [
            _value_weights_at(logprobs, offset, value_tokens, self.top_logprobs)
            for offset in slot_offsets
        ]
        if not ten_is_one_token:
            zero_after_one = self._zero_after_one_probabilities(prompt, slot_offsets)
            for weights, zero in zip(slot_weights, zero_after_one):
                one_or_ten = weights.pop(1, 0.0)
                weights[1] = one_or_ten * (1.0 - zero)
                weights[10] = one_or_ten * zero
        return [_renormalised(weights, len(DIGITS)) for weights in slot_weights]

    def answer_distributions(self, prompt: str, slot_offsets: list[int], answers: list[str]) -> list[list[float]]:
        """For each slot, the model's probabilities of the token written there being each of `answers`
        (e.g. " no", " yes"), renormalised over them: one echo request for every slot, read as
        `digit_distributions` reads its values (an answer missing from the top logprobs gets 0; none of
        them there raises ValueError naming the slot)."""
        if not slot_offsets:
            return []
        logprobs = self._echo_logprobs(prompt)
        return [_renormalised(_value_weights_at(logprobs, offset, list(answers), self.top_logprobs), len(answers))
                for offset in slot_offsets]

    def _echo_logprobs(self, prompt: str) -> dict[str, Any]:
        """choices[0].logprobs of POST {base_url}/completions with echo: the server's top logprobs of
        every token of `prompt` given the tokens before it."""
        payload = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,
            "echo": True,
            "logprobs": self.top_logprobs,
            "temperature": 0,
        }
        return self._request("/completions", payload, _check_echo_reply)["choices"][0]["logprobs"]

    def map(self, function: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
        """function(item) for every item, up to `concurrency` at a time, results in input order.

        The first exception (in input order) propagates; work not yet started is cancelled.
        """
        items = list(items)
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            futures = [pool.submit(function, item) for item in items]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    # ----------------------------------------------------------------------------- the value "10"

    def _server_writes_ten_as_one_token(self) -> bool:
        """Whether the server's tokenizer writes the value "10" in a slot as one token (else as
        "1" "0"), from its echo of TEN_PROBE_PROMPT; asked once per backend (and cached on disk
        like any reply)."""
        with self._ten_probe_lock:
            if self._ten_is_one_token is None:
                payload = {
                    "model": self.model,
                    "prompt": TEN_PROBE_PROMPT,
                    "max_tokens": 1,
                    "echo": True,
                    "logprobs": 1,
                    "temperature": 0,
                }
                reply = self._request("/completions", payload, _check_echo_reply)
                self._ten_is_one_token = _ten_is_one_token(reply["choices"][0]["logprobs"], self.model)
            return self._ten_is_one_token

    def _zero_after_one_probabilities(self, prompt: str, slot_offsets: list[int]) -> list[float]:
        """For each slot, P(next token "0" | prompt[:slot] + "1"): the share of the slot's "1"
        that is the start of "10". One list of S floats for S slots.

        Each slot needs its own prompt: the model must see the prompt before that slot (every
        earlier value still "unknown") and a "1" in the slot, and nothing after it. All S prompts
        go in one POST {base_url}/completions (the `prompt` field takes a list; one choice each),
        without echo: the first generated token's top logprobs are the distribution wanted, and a
        prompt that only extends the main one lets the server reuse its prefix cache.
        """
        prompts = [prompt[:offset] + "1" for offset in slot_offsets]
        payload = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,
            "logprobs": self.top_logprobs,
            "temperature": 0,
        }
        reply = self._request(
            "/completions", payload, lambda reply: _check_continuation_reply(reply, len(prompts))
        )
        # Nothing promises the choices in prompt order; each carries the index of its prompt.
        choices = sorted(reply["choices"], key=lambda choice: choice["index"])
        return [
            _probability_of("0", choice["logprobs"]["top_logprobs"][0], f'after "1" at slot offset {offset}')
            for choice, offset in zip(choices, slot_offsets)
        ]

    # ------------------------------------------------------------------------------------ requests

    def _request(
        self, endpoint: str, payload: dict[str, Any], check_reply: Callable[[Any], None]
    ) -> dict[str, Any]:
        """The reply JSON of POST {base_url}{endpoint}, from the cache when there, with retries.

        `check_reply` raises ValueError when a reply lacks what the caller will read: such a reply
        is retried like a failed request, and never cached.
        """
        cache_path = self._cache_path(endpoint, payload)
        cached = _read_cached_reply(cache_path, check_reply) if cache_path else None
        if cached is not None:
            return cached

        url = self.base_url + endpoint
        url_path = urllib.parse.urlsplit(url).path  # no host: base_url might carry credentials
        body = json.dumps(payload).encode("utf-8")
        attempts = self.max_retries + 1
        last_failure = _Retryable("no attempt made")
        for attempt in range(attempts):
            try:
                reply = self._post_once(url, url_path, body)
                try:
                    check_reply(reply)
                except (ValueError, KeyError, IndexError, TypeError) as problem:
                    raise _Retryable(f"malformed reply ({type(problem).__name__}: {problem})") from None
            except _Retryable as failure:
                last_failure = failure
                if attempt + 1 < attempts:
                    time.sleep(self._retry_wait(attempt, failure.wait_s))
                continue
            if cache_path is not None:
                _write_atomically(cache_path, json.dumps(reply))
            return reply
        raise HttpError(
            self._redact(
                f"POST {url_path} failed after {attempts} attempt(s); "
                f"last problem: {last_failure}"
            )
        )

    def _post_once(self, url: str, url_path: str, body: bytes) -> Any:
        """One POST and its decoded JSON; raises _Retryable or HttpError when it did not work."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with self._in_flight:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as error:
                try:
                    excerpt = _excerpt(error.read())
                except (OSError, HTTPException):  # the body broke off: the status still says enough
                    excerpt = "(body unreadable)"
                finally:
                    error.close()
                problem = self._redact(f"POST {url_path}: HTTP {error.code}: {excerpt}")
                if error.code == 429 or error.code >= 500:
                    raise _Retryable(problem, _retry_after_s(error.headers.get("Retry-After"))) from None
                raise HttpError(problem) from None
            except (OSError, HTTPException) as error:
                # URLError (an OSError) wraps errors raised while connecting; a read that stalls
                # raises TimeoutError itself, a dropped connection ConnectionError or HTTPException.
                reason = error.reason if isinstance(error, urllib.error.URLError) else error
                if isinstance(reason, TimeoutError):
                    raise _Retryable(f"POST {url_path}: timed out after {self.timeout:g} s") from None
                raise _Retryable(self._redact(f"POST {url_path}: connection error: {reason!r}")) from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable(f"malformed reply (not JSON): {_excerpt(raw)}") from None

    def _retry_wait(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait before retry `attempt` + 1: the server's Retry-After when it gave one
        (it knows its own load), else exponential backoff; never more than MAX_SLEEP_S."""
        wait_s = retry_after_s if retry_after_s is not None else self.backoff * 2**attempt
        return min(max(wait_s, 0.0), MAX_SLEEP_S)

    def _redact(self, text: str) -> str:
        """`text` without the API key: some servers echo a rejected key back in their error body."""
        return text.replace(self._api_key, "***") if self._api_key else text

    # --------------------------------------------------------------------------------------- cache

    def _cache_path(self, endpoint: str, payload: dict[str, Any]) -> Path | None:
        """Where the reply to this request is kept: sha256 of the endpoint and the canonical payload
        (which names the model). The API key and the host are not part of it, so a cache survives
        a key rotation or a move of the same model to another server."""
        if self.cache_dir is None:
            return None
        request = endpoint + "\n" + json.dumps(payload, sort_keys=True, ensure_ascii=False)
        return self.cache_dir / f"{hashlib.sha256(request.encode('utf-8')).hexdigest()}.json"


# ------------------------------------------------------------------------------------ reply checks


def _check_chat_reply(reply: Any) -> None:
    """Raises ValueError unless choices[0].message.content is a string."""
    content = reply["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is {type(content).__name__}, not a string")


def _check_echo_reply(reply: Any) -> None:
    """Raises ValueError unless choices[0].logprobs has lists tokens, top_logprobs and text_offset
    of one length (one entry per prompt token)."""
    logprobs = reply["choices"][0]["logprobs"]
    if not isinstance(logprobs, dict):
        raise ValueError("choices[0].logprobs is missing (does the server support echo with logprobs?)")
    lengths = {}
    for field in ("tokens", "top_logprobs", "text_offset"):
        if not isinstance(logprobs.get(field), list):
            raise ValueError(f"choices[0].logprobs.{field} is missing or not a list")
        lengths[field] = len(logprobs[field])
    if len(set(lengths.values())) != 1:
        raise ValueError(f"choices[0].logprobs lists differ in length: {lengths}")


def _check_continuation_reply(reply: Any, n_prompts: int) -> None:
    """Raises ValueError unless there is one choice per prompt, indices 0..n_prompts-1, each with
    top logprobs for its first generated token."""
    choices = reply["choices"]
    indices = sorted(choice["index"] for choice in choices)
    if indices != list(range(n_prompts)):
        raise ValueError(f"{n_prompts} prompts but choices with indices {indices}")
    for choice in choices:
        if not isinstance(choice["logprobs"]["top_logprobs"][0], dict):
            raise ValueError(f"choices[{choice['index']}].logprobs.top_logprobs[0] is not a dict")


def _first_token_at(logprobs: dict[str, Any], offset: int) -> int | None:
    """Index of the first echoed token that starts at character `offset`, None if none does."""
    # The first: later ones at the same offset (zero-width pieces some tokenizers emit) are
    # conditioned on it, not on the text before the offset.
    return next((i for i, start in enumerate(logprobs["text_offset"]) if start == offset), None)


def _ten_is_one_token(probe_logprobs: dict[str, Any], model: str) -> bool:
    """From the echo of TEN_PROBE_PROMPT: True when "10" is one token, False when it is "1" "0".

    Raises ValueError naming `model` otherwise (e.g. "\t1" "0", or "10\n"): the simulator could
    neither read P(10) at a slot nor after a "1" written there.
    """
    tokens, starts = probe_logprobs["tokens"], probe_logprobs["text_offset"]
    index = _first_token_at(probe_logprobs, TEN_PROBE_OFFSET)
    if index is not None and tokens[index] == "10":
        return True
    if (index is not None and tokens[index] == "1" and index + 1 < len(tokens)
            and starts[index + 1] == TEN_PROBE_OFFSET + 1 and tokens[index + 1] == "0"):  # fmt: skip
        return False
    raise ValueError(
        f"{model}: the server tokenizes {TEN_PROBE_PROMPT!r} as {tokens!r}, so the value 10 in a slot "
        "is neither the one token \"10\" nor \"1\" \"0\"; the simulator cannot read P(10) from it"
    )


def _probability_of(token: str, candidates: dict[str, Any], where: str) -> float:
    """exp(logprob) of `token` among a top-logprobs dict; 0 when it is not among them."""
    if token not in candidates:
        return 0.0
    # min: a logprob a rounding error above 0 is still a probability of at most 1.
    return min(1.0, math.exp(_checked_logprob(candidates[token], token, where)))


def _checked_logprob(logprob: Any, token: str, where: str) -> float:
    """`logprob` as a float; raises ValueError when it is not a number or NaN (-inf is fine: P = 0)."""
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)) or math.isnan(logprob):
        raise ValueError(f"malformed reply: logprob of {token!r} {where} is {logprob!r}")
    return float(logprob)


def _value_weights_at(
    logprobs: dict[str, Any], offset: int, value_tokens: list[str], top_logprobs: int
) -> dict[int, float]:
    """value -> unnormalised probability that the token starting at character `offset` is
    value_tokens[value], for the values among its top logprobs (all scaled by one factor).

    `value_tokens` is "0".."10", or "0".."9" where the tokenizer splits "10".
    """
    index = _first_token_at(logprobs, offset)
    if index is None:
        raise ValueError(
            f"no token of the prompt starts at slot offset {offset}: the server's tokenizer merged "
            "the slot with the text before it"
        )
    candidates = logprobs["top_logprobs"][index]
    if not isinstance(candidates, dict):
        raise ValueError(
            f"malformed reply: top_logprobs at slot offset {offset} (token {index}) is "
            f"{type(candidates).__name__}, not a dict of token -> logprob"
        )
    value_logprobs: dict[int, float] = {}
    for value, token in enumerate(value_tokens):
        if token in candidates:
            logprob = _checked_logprob(candidates[token], token, f"at slot offset {offset}")
            if logprob > -math.inf:  # -inf is a probability of 0, as good as absent
                value_logprobs[value] = logprob
    if not value_logprobs:
        raise ValueError(
            f"none of {value_tokens[0]!r}..{value_tokens[-1]!r} is among the top {top_logprobs} "
            f"logprobs at slot offset {offset}: raise top_logprobs"
        )
    # Shifted by the largest so that very negative logprobs do not all underflow to 0.
    largest = max(value_logprobs.values())
    return {value: math.exp(logprob - largest) for value, logprob in value_logprobs.items()}


def _renormalised(weights: dict[int, float], size: int) -> list[float]:
    """`size` probabilities (index = value, e.g. 0..10) proportional to `weights`, 0 for values absent."""
    total = sum(weights.values())
    return [weights.get(value, 0.0) / total for value in range(size)]


# ------------------------------------------------------------------------------------------ helpers


def _excerpt(raw: bytes) -> str:
    """The start of a reply body as one readable line."""
    text = raw.decode("utf-8", errors="replace").strip().replace("\n", " ")
    if not text:
        return "(empty body)"
    return text[:BODY_EXCERPT_CHARS] + ("..." if len(text) > BODY_EXCERPT_CHARS else "")


def _retry_after_s(header: str | None) -> float | None:
    """A numeric Retry-After header in seconds; None when absent or an HTTP date (not worth parsing
    for a wait that is capped at MAX_SLEEP_S anyway)."""
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _read_cached_reply(path: Path, check_reply: Callable[[Any], None]) -> dict[str, Any] | None:
    """The cached reply at `path`; None when there is none or it is unreadable (then refetched)."""
    try:
        reply = json.loads(path.read_text(encoding="utf-8"))
        check_reply(reply)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return reply


def _write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same folder and os.replace, so a
    reader (or a concurrent writer of the same request) never sees a half-written file."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
