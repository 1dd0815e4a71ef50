"""LLM-as-judge for answer correctness, over an OpenAI-compatible ``/v1/chat/completions`` endpoint.

DeepEyes asks a judge model (Qwen2.5-72B-Instruct served by vLLM, temperature 0.3) whether the model's final answer
is consistent with the ground truth, with a few-shot prompt whose examples end in ``Judgement: 1`` or
``Judgement: 0`` (docs/reference.md, "Reward"). This module is our own version of that judge:

* the prompt (:func:`build_judge_prompt`) is written in the same style -- instructions, seven worked examples, then
  the item ending in ``Judgement:`` -- but with our own wording and examples;
* the reply is parsed robustly (:func:`parse_judgement`): ``Judgement: 1`` -> True, ``Judgement: 0`` -> False
  (also a bare ``1``/``0``, markdown bold, the original prompt's ``Judement`` typo, a leading ``<think>`` block);
  anything else is retried and finally gives None;
* HTTP uses the standard library only (``urllib.request`` + ``json``), with retries with exponential backoff on
  connection errors, timeouts, HTTP 5xx, 408 and 429 (``Retry-After`` is honoured). Time is bounded by the wall
  clock, not only per socket read: an attempt without its whole reply ``timeout_s`` after it started is abandoned
  (a server dripping its headers or body one byte a second cannot hold it), a call makes no new attempt once
  ``deadline_s`` has passed, and a reply over ``max_reply_bytes`` is refused;
* verdicts are cached in memory, keyed by ``(model, question, answer, ground_truth)``, and optionally in a JSON-lines
  file (``cache_path``, any path ``etils.epath`` reads: local, or ``gs://`` under a workdir on GCS) that a new
  :class:`LLMJudge` reloads, so a restarted run does not pay for them again. A local file gets one line appended per
  verdict. An object store cannot append: there the new verdicts are kept in memory and the whole object (every
  verdict of the cache) is rewritten after ``cache_flush_every`` new ones and on :meth:`LLMJudge.flush` /
  :meth:`LLMJudge.close`, which the owner of the judge calls at the end of a run. Reading or writing the cache never
  raises: a failure is a warning, the verdicts stay in memory;
* when the endpoint is down, :meth:`LLMJudge.judge` returns None: the caller (``rewards.compute_reward``) falls back
  to rule matching. The first failure of an outage is logged with ``logging.warning`` (once per outage; a later
  verdict ends the outage and logs its recovery), and for ``outage_cooldown_s`` after a transport failure calls
  return None at once instead of waiting for timeouts again (a simple circuit breaker);
* counters (requests, cache hits, failures, fallbacks, ...) are exposed by :meth:`LLMJudge.metrics`.

The original code (Visual-Agent/DeepEyes ``verl/utils/reward_score/vl_agent.py``) differs in ways we do not copy:
it picks the served model from ``/v1/models`` at import time (we do that lazily, only when no model is
configured), sends a random ``seed`` with each request, has no timeout, retry or cache, and scores an unparseable
reply as 0 (we retry and then report None, so the caller can fall back to rule matching).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from etils import epath

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful assistant."

JUDGE_INSTRUCTIONS = (
  "You will compare two answers to a question about an image. [Question] is the question, [Standard Answer] is the "
  "correct answer, and [Model Answer] is the final answer taken from a model's response.\n"
  "Decide whether [Model Answer] is consistent with [Standard Answer]. They are consistent when they mean the same "
  "thing, even if one is shorter, longer or worded differently: for example 'red' and 'the car is red', or 'B' and "
  "'B. wooden' when option B is 'wooden'. They are not consistent when the model answer contradicts the standard "
  "answer, names a different object, option, number or place, or hedges between several answers.\n"
  "Reply with 'Judgement: 1' if they are consistent and 'Judgement: 0' if they are not. Output nothing else."
)

# (question, standard answer, model answer, verdict): our own examples, in the style of the original's seven.
JUDGE_EXAMPLES: tuple[tuple[str, str, str, int], ...] = (
  ("What color is the umbrella the woman is holding?", "The umbrella is red.", "red", 1),
  (
    "Is the clock to the left or to the right of the window?",
    "The clock is to the right of the window.",
    "On the right side.",
    1,
  ),
  ("How many birds are sitting on the wire?", "3", "There are three birds on the wire.", 1),
  ("What is the bench made of?\nA. metal\nB. wood\nC. stone", "B", "(B) wood", 1),
  ("Is the door of the shop open?", "No, the door is closed.", "Yes", 0),
  ("What word is written on the sign?", "STOP", "SLOW", 0),
  ("What color is the backpack on the chair?", "The backpack is black.", "black or dark blue", 0),
)


def build_judge_prompt(question: str, answer: str, ground_truth: str) -> str:
  """The user message sent to the judge: instructions, the few-shot examples, then the item ending in ``Judgement:``."""
  parts = [JUDGE_INSTRUCTIONS, ""]
  for q, gt, pred, verdict in JUDGE_EXAMPLES:
    parts += [f"[Question]: {q}", f"[Standard Answer]: {gt}", f"[Model Answer]: {pred}", f"Judgement: {verdict}", ""]
  parts += [f"[Question]: {question}", f"[Standard Answer]: {ground_truth}", f"[Model Answer]: {answer}", "Judgement:"]
  return "\n".join(parts)


# "Judgement: 1", "judgment 0", "**Judgement:** 1", "Judement: 1" (the original prompt's own spelling), "Judgement：1".
_JUDGEMENT_RE = re.compile(r"jud(?:ge?|e)ment\W*([01])(?![\d.])", re.IGNORECASE)
_BARE_RE = re.compile(r"^\W*([01])\W*$")


def parse_judgement(text: str | None) -> bool | None:
  """Parse a judge reply: the last ``Judgement: 1``/``Judgement: 0`` wins; a reply that is only ``1``/``0`` too.

  A leading ``<think>...</think>`` block (reasoning judges) is ignored. Anything else gives None.
  """
  if not isinstance(text, str):
    return None
  text = text.split("</think>")[-1].strip()
  found = _JUDGEMENT_RE.findall(text)
  if found:
    return found[-1] == "1"
  bare = _BARE_RE.match(text)
  if bare:
    return bare.group(1) == "1"
  return None


@runtime_checkable
class Judge(Protocol):
  """What the reward functions need from a judge: a verdict, or None when no verdict could be had."""

  def judge(self, question: str, answer: str, ground_truth: str) -> bool | None: ...


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """Where and how to reach the judge.

  ``url`` may be the server root (``http://host:8000``), the OpenAI base URL (``http://host:8000/v1``) or the full
  ``.../v1/chat/completions`` URL. An empty ``model`` means: use the first model listed by ``GET /v1/models`` (as
  the original does). ``max_retries`` counts retries after the first attempt; the n-th retry waits
  ``backoff_s * 2**(n-1)`` seconds (capped by ``max_backoff_s``, plus up to 10% jitter). ``timeout_s`` bounds one
  attempt (connect to last byte), ``deadline_s`` one call with its retries; ``max_reply_bytes`` caps a reply.
  ``cache_path``: the JSON-lines verdict cache (local or a URL such as ``gs://...``; None: memory only);
  ``cache_flush_every``: for a URL, new verdicts kept in memory before the object is rewritten.
  """

  url: str
  model: str = ""
  api_key: str = dataclasses.field(default="", repr=False)
  temperature: float = 0.3
  timeout_s: float = 30.0
  deadline_s: float = 120.0
  max_reply_bytes: int = 1 << 20
  max_retries: int = 3
  backoff_s: float = 1.0
  max_workers: int = 16
  cache_path: str | None = None
  cache_flush_every: int = 64
  max_tokens: int | None = 64
  max_backoff_s: float = 30.0
  outage_cooldown_s: float = 30.0
  system_prompt: str = SYSTEM_PROMPT

  def __post_init__(self):
    if not self.url:
      raise ValueError("JudgeConfig.url must be set (e.g. http://127.0.0.1:8000/v1)")
    if self.timeout_s <= 0 or self.deadline_s <= 0:
      raise ValueError(f"timeout_s and deadline_s must be > 0, got {self.timeout_s} and {self.deadline_s}")
    if self.max_reply_bytes < 1024:
      raise ValueError(f"max_reply_bytes must be >= 1024, got {self.max_reply_bytes}")
    if self.max_retries < 0:
      raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
    if self.backoff_s < 0 or self.max_backoff_s < 0 or self.outage_cooldown_s < 0:
      raise ValueError("backoff_s, max_backoff_s and outage_cooldown_s must be >= 0")
    if self.max_workers < 1:
      raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
    if self.cache_flush_every < 1:
      raise ValueError(f"cache_flush_every must be >= 1, got {self.cache_flush_every}")

  @classmethod
  def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> JudgeConfig | None:
    """Build a config from the environment; None when no judge URL is set.

    ``DEEPEYES_JUDGE_URL`` (fallback ``OPENAI_BASE_URL``), ``DEEPEYES_JUDGE_MODEL`` (empty: ask ``/v1/models``),
    ``DEEPEYES_JUDGE_API_KEY`` (fallback ``OPENAI_API_KEY``), and optionally ``DEEPEYES_JUDGE_CACHE`` (the
    JSON-lines cache path). Keyword ``overrides`` replace any field.
    """
    env = os.environ if environ is None else environ
    url = env.get("DEEPEYES_JUDGE_URL") or env.get("OPENAI_BASE_URL") or overrides.pop("url", "")
    if not url:
      return None
    fields: dict[str, Any] = {
      "url": url,
      "model": env.get("DEEPEYES_JUDGE_MODEL", ""),
      "api_key": env.get("DEEPEYES_JUDGE_API_KEY") or env.get("OPENAI_API_KEY") or "",
      "cache_path": env.get("DEEPEYES_JUDGE_CACHE") or None,
    }
    fields.update(overrides)
    return cls(**fields)


def endpoint_urls(url: str) -> tuple[str, str]:
  """``(chat_completions_url, models_url)`` for a server root, an OpenAI base URL or a full chat-completions URL."""
  u = url.rstrip("/")
  if u.endswith("/chat/completions"):
    base = u[: -len("/chat/completions")]
  elif u.endswith("/v1"):
    base = u
  else:
    base = u + "/v1"
  return base + "/chat/completions", base + "/models"


_RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class _AttemptError(Exception):
  """One failed attempt. ``transport``: the endpoint looked unreachable/overloaded (counts toward an outage)."""

  def __init__(self, message: str, *, retriable: bool, transport: bool, retry_after: float | None = None):
    super().__init__(message)
    self.retriable = retriable
    self.transport = transport
    self.retry_after = retry_after


class LLMJudge:
  """A thread-safe client for the judge endpoint with caching, retries and an outage fallback (see module doc)."""

  def __init__(self, config: JudgeConfig):
    self.config = config
    self._chat_url, self._models_url = endpoint_urls(config.url)
    host = urllib.parse.urlsplit(self._chat_url).hostname or ""
    # Never send loopback traffic through an http_proxy from the environment; other hosts follow the environment.
    handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
    self._opener = urllib.request.build_opener(*handlers)
    self._lock = threading.Lock()
    self._model_lock = threading.Lock()
    self._model: str | None = config.model or None
    self._cache: dict[tuple[str, str, str, str], bool] = {}
    self._counters: dict[str, int] = dict.fromkeys(
      (
        "requests",
        "retries",
        "verdicts",
        "cache_hits",
        "failures",
        "unparseable",
        "fallbacks",
        "skipped_during_outage",
        "outages",
        "deadline_exceeded",
        "oversized_replies",
        "disk_cache_loaded",
        "disk_cache_bad_lines",
        "disk_cache_write_failures",
      ),
      0,
    )
    self._outage = False
    self._cooldown_until = 0.0
    # The disk cache: a local file is appended to; an object store's object (gs://...) is rewritten whole after
    # `cache_flush_every` new verdicts (`_unsaved` counts those not written yet), one rewrite at a time.
    self._cache_file = epath.Path(config.cache_path) if config.cache_path else None
    self._cache_is_local = bool(config.cache_path) and "://" not in str(config.cache_path)
    self._unsaved = 0
    self._flush_lock = threading.Lock()
    if self._cache_file is not None:
      self._load_disk_cache()

  # --- public API ---------------------------------------------------------------------------------------------
  @property
  def available(self) -> bool:
    """False while an outage is being reported (the last call ended without a verdict)."""
    with self._lock:
      return not self._outage

  def metrics(self) -> dict[str, int]:
    """A snapshot of the counters (``requests`` counts HTTP attempts, retries included; ``failures`` counts failed
    attempts; ``fallbacks`` counts calls that returned None; ``cache_hits`` counts calls answered from the cache)."""
    with self._lock:
      out = dict(self._counters)
      out["cache_size"] = len(self._cache)
      return out

  @property
  def counters(self) -> dict[str, int]:
    return self.metrics()

  def flush(self) -> None:
    """Writes the verdicts not yet on disk: for a ``cache_path`` URL, rewrites the object with every verdict of the
    cache (a local file already has them: each was appended when it came). A failure is a warning."""
    if self._cache_file is None or self._cache_is_local:
      return
    with self._flush_lock:  # one rewrite at a time, each with every verdict known when it starts
      with self._lock:
        if not self._unsaved:
          return
        unsaved, self._unsaved = self._unsaved, 0
        text = "".join(_cache_line(key, verdict) for key, verdict in self._cache.items())
      try:
        self._cache_file.write_bytes(text.encode("utf-8", errors="replace"))  # bytes: no locale encoding
      except Exception as e:  # any storage error (OSError, the TF / fsspec backends' own): the run goes on
        with self._lock:
          self._unsaved += unsaved  # written with the next attempt
          self._counters["disk_cache_write_failures"] += 1
        logger.warning("LLM judge: cannot write the cache %s: %s", self._cache_file, e)

  def close(self) -> None:
    """`flush`; the judge stays usable (a later verdict is written by the next flush)."""
    self.flush()

  def __enter__(self) -> LLMJudge:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def judge(self, question: str | None, answer: str, ground_truth: str) -> bool | None:
    """True/False: the judge's verdict on ``answer`` against ``ground_truth``; None: no verdict (endpoint down, or
    no parseable reply after all retries)."""
    q, a, g = "" if question is None else str(question), str(answer), str(ground_truth)
    model = self._resolve_model()
    if model is None:
      return self._no_verdict("could not list models at " + self._models_url, transport=True)
    key = (model, q, a, g)
    with self._lock:
      if key in self._cache:
        self._counters["cache_hits"] += 1
        return self._cache[key]
      if time.monotonic() < self._cooldown_until:
        self._counters["skipped_during_outage"] += 1
        self._counters["fallbacks"] += 1
        return None
    payload = {
      "model": model,
      "messages": [
        {"role": "system", "content": self.config.system_prompt},
        {"role": "user", "content": build_judge_prompt(q, a, g)},
      ],
      "temperature": self.config.temperature,
    }
    if self.config.max_tokens:
      payload["max_tokens"] = self.config.max_tokens
    try:
      verdict = self._request_verdict(payload)
    except _AttemptError as e:
      return self._no_verdict(str(e), transport=e.transport)
    self._store(key, verdict)
    return verdict

  def judge_many(
    self, items: Iterable[Sequence[str] | Mapping[str, str]], max_workers: int | None = None
  ) -> list[bool | None]:
    """Judge many ``(question, answer, ground_truth)`` items (tuples or mappings with those keys) concurrently on a
    thread pool of ``max_workers`` (default ``config.max_workers``). Duplicates are judged once. Order is kept."""
    triples = [_as_triple(item) for item in items]
    unique = list(dict.fromkeys(triples))
    workers = min(max_workers or self.config.max_workers, len(unique))
    if workers <= 1:
      results = {t: self.judge(*t) for t in unique}
    else:
      with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
        results = dict(zip(unique, pool.map(lambda t: self.judge(*t), unique)))
    return [results[t] for t in triples]

  # --- internals ----------------------------------------------------------------------------------------------
  def _resolve_model(self) -> str | None:
    if self._model:
      return self._model
    with self._model_lock:
      if self._model:
        return self._model
      with self._lock:
        if time.monotonic() < self._cooldown_until:
          return None
        self._counters["requests"] += 1
      try:
        body = self._http("GET", self._models_url, None)
        self._model = str(json.loads(body)["data"][0]["id"])
        logger.info("LLM judge: using model %r served at %s", self._model, self._models_url)
      except (_AttemptError, ValueError, KeyError, IndexError, TypeError) as e:
        with self._lock:
          self._counters["failures"] += 1
        logger.debug("LLM judge: listing models failed: %s", e)
        return None
      return self._model

  def _request_verdict(self, payload: dict[str, Any]) -> bool:
    """POST until a verdict parses; raises the last :class:`_AttemptError` when the attempts run out."""
    data = json.dumps(payload).encode("utf-8")
    last: _AttemptError | None = None
    deadline = time.monotonic() + self.config.deadline_s
    for attempt in range(self.config.max_retries + 1):
      if attempt:
        wait = self._backoff(attempt, last)
        if time.monotonic() + wait >= deadline:  # no time left for another attempt
          with self._lock:
            self._counters["deadline_exceeded"] += 1
          break
        with self._lock:
          self._counters["retries"] += 1
        time.sleep(wait)
      with self._lock:
        self._counters["requests"] += 1
      try:
        body = self._http("POST", self._chat_url, data)
        try:
          content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
          raise _AttemptError(f"malformed response body ({e!r}): {body[:200]!r}", retriable=True, transport=False)
        verdict = parse_judgement(content)
        if verdict is None:
          with self._lock:
            self._counters["unparseable"] += 1
          raise _AttemptError(f"unparseable judge reply: {str(content)[:200]!r}", retriable=True, transport=False)
        return verdict
      except _AttemptError as e:
        with self._lock:
          self._counters["failures"] += 1
        last = e
        logger.debug("LLM judge attempt %d failed: %s", attempt + 1, e)
        if not e.retriable:
          break
    assert last is not None
    raise last

  def _http(self, method: str, url: str, data: bytes | None) -> str:
    """One HTTP attempt, bounded by the wall clock: it runs in a daemon thread that the caller stops waiting for
    after ``timeout_s`` (a server that drips its status line or headers is only bounded per socket read inside
    http.client; the thread ends at its next read timeout and never delays the interpreter's exit)."""
    result: dict[str, Any] = {}

    def attempt():
      try:
        result["body"] = self._http_attempt(method, url, data)
      except BaseException as e:  # handed to the caller
        result["error"] = e

    worker = threading.Thread(target=attempt, daemon=True, name="judge-http")
    worker.start()
    worker.join(self.config.timeout_s + 0.5)  # _http_attempt's own clock stops the body a little earlier
    if worker.is_alive():
      raise _AttemptError(f"no reply from {url} within {self.config.timeout_s} s", retriable=True, transport=True)
    if "error" in result:
      raise result["error"]
    return result["body"]

  def _http_attempt(self, method: str, url: str, data: bytes | None) -> str:
    headers = {"Accept": "application/json"}
    if data is not None:
      headers["Content-Type"] = "application/json"
    if self.config.api_key:
      headers["Authorization"] = f"Bearer {self.config.api_key}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    deadline = time.monotonic() + self.config.timeout_s  # from before connecting
    try:
      with self._opener.open(request, timeout=self.config.timeout_s) as response:
        return self._read_bounded(response, url, deadline)
    except urllib.error.HTTPError as e:
      retry_after = _parse_retry_after(e.headers.get("Retry-After") if e.headers else None)
      retriable = e.code in _RETRIABLE_STATUS
      e.close()
      raise _AttemptError(
        f"HTTP {e.code} from {url}", retriable=retriable, transport=retriable, retry_after=retry_after
      )
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, DNS, timeouts
      reason = getattr(e, "reason", e)
      raise _AttemptError(f"cannot reach {url}: {reason!r}", retriable=True, transport=True)

  def _read_bounded(self, response, url: str, deadline: float) -> str:
    """The body, read in chunks against the attempt's wall-clock `deadline` (``timeout_s`` from before connecting;
    the socket timeout alone bounds each read, so a slow drip would pass it) and the size cap."""
    chunks, size = [], 0
    while chunk := response.read1(1 << 16):
      size += len(chunk)
      if size > self.config.max_reply_bytes:
        with self._lock:
          self._counters["oversized_replies"] += 1
        raise _AttemptError(f"reply from {url} exceeds {self.config.max_reply_bytes} bytes", retriable=False,
                            transport=False)  # fmt: skip
      chunks.append(chunk)
      if time.monotonic() > deadline:
        raise _AttemptError(f"reply from {url} not complete after {self.config.timeout_s} s", retriable=True,
                            transport=True)  # fmt: skip
    return b"".join(chunks).decode("utf-8", errors="replace")

  def _backoff(self, attempt: int, last: _AttemptError | None) -> float:
    delay = min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s)
    if last is not None and last.retry_after is not None:
      delay = max(delay, min(last.retry_after, self.config.max_backoff_s))
    return delay * (1.0 + 0.1 * random.random())

  def _store(self, key: tuple[str, str, str, str], verdict: bool) -> None:
    flush = False
    with self._lock:
      self._counters["verdicts"] += 1
      self._cache[key] = verdict
      if self._outage:
        self._outage = False
        logger.info("LLM judge at %s is answering again", self._chat_url)
      self._cooldown_until = 0.0
      if self._cache_file is not None and self._cache_is_local:
        try:
          with self._cache_file.open("ab") as f:  # bytes: epath opens text in the locale's encoding
            f.write(_cache_line(key, verdict).encode("utf-8", errors="replace"))
        except OSError as e:
          self._counters["disk_cache_write_failures"] += 1
          logger.warning("LLM judge: cannot append to the cache file %s: %s", self._cache_file, e)
      elif self._cache_file is not None:
        self._unsaved += 1
        # every N unsaved verdicts: after a failed rewrite (they stay unsaved) the next try is N verdicts later
        flush = self._unsaved % self.config.cache_flush_every == 0
    if flush:  # outside the lock: the other threads go on judging while the object uploads
      self.flush()

  def _no_verdict(self, reason: str, *, transport: bool) -> None:
    with self._lock:
      self._counters["fallbacks"] += 1
      if transport and self.config.outage_cooldown_s > 0:
        self._cooldown_until = time.monotonic() + self.config.outage_cooldown_s
      if not self._outage:
        self._outage = True
        self._counters["outages"] += 1
        logger.warning(
          "LLM judge unavailable (%s); falling back to rule-based answer matching until it answers again. "
          "This is logged once per outage.",
          reason,
        )
    return None

  def _load_disk_cache(self) -> None:
    """The verdicts of ``cache_path`` (bad lines counted and skipped). A cache that cannot be read is a warning: the
    run starts with an empty cache."""
    try:
      if not self._cache_file.exists():
        return
      with self._cache_file.open("rb") as f:  # entered: epath's TF backend returns a context manager
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    except Exception as e:  # OSError, or a storage backend's own error
      logger.warning("LLM judge: cannot read the cache %s (starting without it): %s", self._cache_file, e)
      return
    for line in lines:
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        key = (str(r["model"]), str(r["question"]), str(r["answer"]), str(r["ground_truth"]))
        verdict = r["verdict"]
        if not isinstance(verdict, bool):
          raise TypeError(f"verdict {verdict!r} is not a bool")
      except (ValueError, KeyError, TypeError):  # e.g. a line cut short by a crash
        self._counters["disk_cache_bad_lines"] += 1
        continue
      self._cache[key] = verdict
      self._counters["disk_cache_loaded"] += 1


def _cache_line(key: tuple[str, str, str, str], verdict: bool) -> str:
  """One JSON line of the verdict cache."""
  record = dict(zip(("model", "question", "answer", "ground_truth"), key), verdict=verdict)
  return json.dumps(record, ensure_ascii=False) + "\n"


def _as_triple(item: Sequence[str] | Mapping[str, str]) -> tuple[str, str, str]:
  if isinstance(item, Mapping):
    q, a, g = item.get("question"), item["answer"], item["ground_truth"]
  else:
    q, a, g = item
  return ("" if q is None else str(q), str(a), str(g))


def _parse_retry_after(value: str | None) -> float | None:
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    return None  # an HTTP date: ignore, the exponential backoff applies
