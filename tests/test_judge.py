"""The LLM judge client against a real local HTTP server that mimics an OpenAI-compatible /v1/chat/completions."""

import http.server
import json
import logging
import re
import threading
import time

import pytest
from etils import epath
from test_workdir_paths import gcs  # noqa: F401  (a fake gs:// bucket, in memory, behind epath's two backends)

from deepeyes_jax.reward import judge as J
from deepeyes_jax.reward import rewards as R

MODEL = "judge-72b"
QUESTION = "What color is the umbrella?"
GT = "The umbrella is red."

_ITEM_RE = re.compile(
  r"\[Question\]: (?P<q>.*)\n\[Standard Answer\]: (?P<gt>.*)\n\[Model Answer\]: (?P<a>.*)\nJudgement:", re.DOTALL
)


class FakeJudgeServer:
  """A ThreadingHTTPServer on 127.0.0.1 (ephemeral port). It checks each request (model, temperature 0.3, system +
  user messages, the item at the end of the prompt) and answers "Judgement: 1" when the answer's words all occur in
  the ground truth, else "Judgement: 0". ``fail(mode, n)`` makes the next n chat requests fail with mode "500",
  "429", "400", "sleep" (sleep past the client's timeout, then answer), "garbage" (a reply without a verdict) or
  "bad_json" (a body that is not JSON). Problems found in requests are collected in ``errors``."""

  def __init__(self, delay_s=0.0, sleep_s=1.0):
    self.delay_s, self.sleep_s = delay_s, sleep_s
    self.lock = threading.Lock()
    self.failures: list[str] = []
    self.chat_requests: list[dict] = []
    self.items: list[tuple[str, str, str]] = []
    self.headers: list[dict] = []
    self.model_requests = 0
    self.errors: list[str] = []
    self.active = self.max_active = 0
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def _send(self, code, body, headers=()):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
          self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

      def do_GET(self):
        if self.path != "/v1/models":
          return self._send(404, {"error": "not found"})
        with server.lock:
          server.model_requests += 1
        self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
          server.chat_requests.append(body)
          server.headers.append(dict(self.headers))
          mode = server.failures.pop(0) if server.failures else None
        self._answer(body, mode)

      def _answer(self, body, mode):
        problems = []
        if self.path != "/v1/chat/completions":
          problems.append(f"path {self.path}")
        if body.get("model") != MODEL:
          problems.append(f"model {body.get('model')!r}")
        if body.get("temperature") != 0.3:
          problems.append(f"temperature {body.get('temperature')!r}")
        messages = body.get("messages", [])
        if [m.get("role") for m in messages] != ["system", "user"]:
          problems.append(f"roles {[m.get('role') for m in messages]}")
        last = "[Question]: " + messages[-1]["content"].rsplit("[Question]: ", 1)[-1] if messages else ""
        item = _ITEM_RE.fullmatch(last)
        if item is None or "Judgement: 1" not in messages[-1]["content"]:  # the few-shot examples must be there
          problems.append("prompt does not end with the item / has no examples")
        if problems:
          with server.lock:
            server.errors.extend(problems)
          return self._send(400, {"error": "; ".join(problems)})
        q, gt, a = item.group("q"), item.group("gt"), item.group("a")
        with server.lock:
          server.items.append((q, a, gt))
        with server.lock:  # requests in flight, counted before any reply is written (the client waits for it)
          server.active += 1
          server.max_active = max(server.max_active, server.active)
        time.sleep(server.delay_s)
        with server.lock:
          server.active -= 1
        if mode in ("500", "400"):
          return self._send(int(mode), {"error": "boom"})
        if mode == "429":
          return self._send(429, {"error": "slow down"}, headers=[("Retry-After", "0")])
        if mode == "bad_json":
          return self._send(200, "<html>oops</html>")
        if mode == "sleep":
          time.sleep(server.sleep_s)
        if mode == "huge":  # a reply far over the client's cap
          return self._send(200, {"choices": [{"message": {"content": "x" * (4 << 20)}}]})
        if mode == "drip_headers":  # the status line and headers, one byte every 0.1 s (never a body)
          for b in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"x" * 200:
            self.wfile.write(bytes([b]))
            self.wfile.flush()
            time.sleep(0.1)
          return None
        if mode == "drip":  # a valid reply, one byte every 0.1 s: each socket read is quick, the whole is not
          data = json.dumps({"choices": [{"message": {"content": "Judgement: 1"}}]}).encode()
          self.send_response(200)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          for b in data:
            self.wfile.write(bytes([b]))
            self.wfile.flush()
            time.sleep(0.1)
          return None
        words = set(re.findall(r"\w+", a.lower()))
        verdict = 1 if words and words <= set(re.findall(r"\w+", gt.lower())) else 0
        content = "I am not sure what you mean." if mode == "garbage" else f"Judgement: {verdict}"
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.httpd.block_on_close = False
    self.httpd.handle_error = lambda request, address: None  # e.g. a broken pipe after a client timeout
    self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    self.thread.start()
    self.stopped = False

  @property
  def url(self):
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

  def fail(self, mode, n=1):
    with self.lock:
      self.failures.extend([mode] * n)

  def stop(self):
    if not self.stopped:
      self.stopped = True
      self.httpd.shutdown()
      self.httpd.server_close()
      self.thread.join(timeout=5)


@pytest.fixture
def server():
  s = FakeJudgeServer()
  try:
    yield s
  finally:
    s.stop()
  assert s.errors == []


def make_judge(server, **kw):
  fields = dict(url=server.url, model=MODEL, api_key="secret", timeout_s=2.0, max_retries=2, backoff_s=0.01)
  fields.update(kw)
  return J.LLMJudge(J.JudgeConfig(**fields))


# --- verdicts ------------------------------------------------------------------------------------------------
def test_verdicts_and_request_shape(server):
  judge = make_judge(server)
  assert judge.judge(QUESTION, "red", GT) is True
  assert judge.judge(QUESTION, "blue", GT) is False
  assert server.items == [(QUESTION, "red", GT), (QUESTION, "blue", GT)]
  request = server.chat_requests[0]
  assert request["model"] == MODEL and request["temperature"] == 0.3
  assert request["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
  assert request["messages"][1]["content"] == J.build_judge_prompt(QUESTION, "red", GT)
  assert server.headers[0]["Authorization"] == "Bearer secret"
  m = judge.metrics()
  assert (m["requests"], m["verdicts"], m["failures"], m["fallbacks"], m["cache_hits"]) == (2, 2, 0, 0, 0)
  assert judge.available


def test_model_is_discovered_when_not_configured(server):
  judge = make_judge(server, model="", url=server.url.removesuffix("/v1"))  # the server root works too
  assert judge.judge(QUESTION, "red", GT) is True
  assert judge.judge(QUESTION, "blue", GT) is False
  assert server.model_requests == 1 and server.chat_requests[0]["model"] == MODEL


@pytest.mark.parametrize(
  "reply, verdict",
  [
    ("Judgement: 1", True),
    ("Judgement: 0", False),
    ("judgment:0", False),
    ("**Judgement:** 1", True),
    ("Judement: 1", True),
    ("1", True),
    (" 0.\n", False),
    ("<think>maybe Judgement: 0</think>\nJudgement: 1", True),
    ("The answers differ. Judgement: 0", False),
    ("Judgement: 0\nOn reflection they match. Judgement: 1", True),  # the last verdict wins
    ("They are consistent.", None),
    ("Judgement: 10", None),
    ("", None),
    (None, None),
  ],
)
def test_parse_judgement(reply, verdict):
  assert J.parse_judgement(reply) is verdict


def test_endpoint_urls_and_config_from_env():
  chat, models = J.endpoint_urls("http://h:8000/v1/")
  assert (chat, models) == ("http://h:8000/v1/chat/completions", "http://h:8000/v1/models")
  assert J.endpoint_urls("http://h:8000")[0] == "http://h:8000/v1/chat/completions"
  assert J.endpoint_urls("http://h:8000/v1/chat/completions")[1] == "http://h:8000/v1/models"

  env = {"DEEPEYES_JUDGE_URL": "http://a/v1", "DEEPEYES_JUDGE_MODEL": "m", "DEEPEYES_JUDGE_API_KEY": "sk-secret-1"}
  cfg = J.JudgeConfig.from_env(env)
  assert (cfg.url, cfg.model, cfg.api_key, cfg.temperature, cfg.cache_path) == (
    "http://a/v1",
    "m",
    "sk-secret-1",
    0.3,
    None,
  )
  assert "sk-secret-1" not in repr(cfg)  # the key is kept out of logs
  cfg = J.JudgeConfig.from_env({"OPENAI_BASE_URL": "http://b/v1", "OPENAI_API_KEY": "ok"}, max_workers=4)
  assert (cfg.url, cfg.model, cfg.api_key, cfg.max_workers) == ("http://b/v1", "", "ok", 4)
  assert J.JudgeConfig.from_env({}) is None
  with pytest.raises(ValueError):
    J.JudgeConfig(url="")


# --- retries and timeouts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["500", "429", "garbage", "bad_json"])
def test_retries_then_success(server, mode):
  server.fail(mode, 2)
  judge = make_judge(server, max_retries=2)
  assert judge.judge(QUESTION, "red", GT) is True
  assert len(server.chat_requests) == 3
  m = judge.metrics()
  assert (m["requests"], m["retries"], m["failures"], m["verdicts"], m["fallbacks"]) == (3, 2, 2, 1, 0)
  assert m["unparseable"] == (2 if mode == "garbage" else 0)


def test_gives_up_after_max_retries(server, caplog):
  caplog.set_level(logging.WARNING, logger=J.__name__)
  server.fail("garbage", 10)
  judge = make_judge(server, max_retries=2)
  assert judge.judge(QUESTION, "red", GT) is None
  assert len(server.chat_requests) == 3  # 1 + max_retries
  assert judge.metrics()["fallbacks"] == 1 and not judge.available
  assert any("unparseable" in r.getMessage() for r in caplog.records)


def test_client_errors_are_not_retried(server):
  server.fail("400", 1)
  judge = make_judge(server, max_retries=3)
  assert judge.judge(QUESTION, "red", GT) is None
  assert len(server.chat_requests) == 1
  assert judge.judge(QUESTION, "red", GT) is True  # not a transport outage: no cooldown


def test_backoff_grows_exponentially(server):
  server.fail("500", 3)
  judge = make_judge(server, max_retries=3, backoff_s=0.05)
  start = time.monotonic()
  assert judge.judge(QUESTION, "red", GT) is True
  assert time.monotonic() - start >= 0.05 + 0.1 + 0.2  # waits 0.05, 0.1, 0.2 s before the retries


def test_timeout_then_retry(server):
  server.sleep_s = 3.0
  server.fail("sleep", 1)
  judge = make_judge(server, timeout_s=0.3, max_retries=1)
  start = time.monotonic()
  assert judge.judge(QUESTION, "red", GT) is True  # the first attempt timed out, the retry answered
  assert time.monotonic() - start < 2.5  # did not wait for the slow reply
  assert judge.metrics()["failures"] == 1

  server.fail("sleep", 5)
  start = time.monotonic()
  assert judge.judge(QUESTION, "blue", GT) is None  # every attempt timed out
  assert time.monotonic() - start < 2.5
  assert judge.metrics()["fallbacks"] == 1


def test_wall_clock_bounds_a_dripping_server_and_a_huge_reply(server):
  """A server that sends its reply one byte every 0.1 s never trips the socket timeout; the attempt is still
  abandoned after timeout_s of wall clock, and the call after deadline_s. A reply over max_reply_bytes is refused
  without retry."""
  server.fail("drip", 10)
  judge = make_judge(server, timeout_s=0.5, deadline_s=1.5, max_retries=5, backoff_s=0.2)
  start = time.monotonic()
  assert judge.judge(QUESTION, "red", GT) is None
  took = time.monotonic() - start
  assert took < 3.0, took  # the reply alone would take ~6 s per attempt, 6 attempts
  m = judge.metrics()
  assert m["deadline_exceeded"] == 1 and m["fallbacks"] == 1 and 2 <= m["requests"] <= 4

  with server.lock:
    server.failures[:] = ["drip_headers"] * 10
  judge = make_judge(server, timeout_s=0.5, deadline_s=1.0, max_retries=5, backoff_s=0.2)
  start = time.monotonic()
  assert judge.judge(QUESTION, "red", GT) is None  # the headers alone would take ~26 s
  assert time.monotonic() - start < 3.0

  judge = make_judge(server, max_reply_bytes=1 << 20)
  with server.lock:
    server.failures[:] = ["huge"]
  assert judge.judge(QUESTION, "blue", GT) is None
  m = judge.metrics()
  assert m["oversized_replies"] == 1 and m["requests"] == 1  # not retried


# --- concurrency and caching ---------------------------------------------------------------------------------
def test_judge_many_is_concurrent(server):
  server.delay_s = 0.2
  judge = make_judge(server, max_workers=16)
  colors = ["red", "blue", "green", "pink", "black"]
  items = [(f"Q{i}: what color?", colors[i % 5], f"The thing is {colors[(i // 5) % 5]}.") for i in range(20)]
  start = time.monotonic()
  verdicts = judge.judge_many(items, max_workers=8)
  elapsed = time.monotonic() - start
  assert verdicts == [colors[i % 5] == colors[(i // 5) % 5] for i in range(20)]
  assert len(server.chat_requests) == 20
  assert 2 <= server.max_active <= 8
  assert elapsed < 20 * 0.2 * 0.6  # well below the serial time (4 s)


def test_judge_many_asks_duplicates_once_and_accepts_mappings(server):
  judge = make_judge(server)
  items = [(QUESTION, "red", GT), {"question": QUESTION, "answer": "red", "ground_truth": GT}, (QUESTION, "blue", GT)]
  assert judge.judge_many(items) == [True, True, False]
  assert len(server.chat_requests) == 2


def test_memory_cache(server):
  judge = make_judge(server)
  assert judge.judge(QUESTION, "red", GT) is True
  assert judge.judge(QUESTION, "red", GT) is True
  assert len(server.chat_requests) == 1
  assert judge.metrics()["cache_hits"] == 1
  assert judge.judge("Another question?", "red", GT) is True  # the question is part of the key
  assert len(server.chat_requests) == 2


def test_disk_cache_survives_a_new_client(server, tmp_path):
  path = tmp_path / "judge_cache.jsonl"
  first = make_judge(server, cache_path=str(path))
  assert first.judge_many([(QUESTION, "red", GT), (QUESTION, "blue", GT)]) == [True, False]
  assert len(path.read_text().splitlines()) == 2
  with open(path, "a") as f:
    f.write('{"model": "judge-72b", "question": "cut sh')  # a line cut short by a crash
  server.stop()
  second = make_judge(server, cache_path=str(path))
  assert second.judge(QUESTION, "red", GT) is True and second.judge(QUESTION, "blue", GT) is False
  m = second.metrics()
  assert (m["requests"], m["cache_hits"], m["disk_cache_loaded"], m["disk_cache_bad_lines"]) == (0, 2, 2, 1)
  assert len(server.chat_requests) == 2
  # Another judge model does not reuse the verdicts.
  assert make_judge(server, cache_path=str(path), model="other", max_retries=0).judge(QUESTION, "red", GT) is None


def _cache_rows(path) -> list[tuple[str, bool]]:
  return [(r["answer"], r["verdict"]) for r in map(json.loads, epath.Path(path).read_text().splitlines())]


def test_local_disk_cache_is_appended_per_verdict_and_flush_adds_nothing(server, tmp_path):
  path = tmp_path / "judge_cache.jsonl"
  judge = make_judge(server, cache_path=str(path), cache_flush_every=100)
  judge.judge(QUESTION, "red", GT)
  assert _cache_rows(path) == [("red", True)]  # on disk at once, not after 100 verdicts
  judge.judge(QUESTION, "blue", GT)
  judge.close()
  judge.flush()
  assert _cache_rows(path) == [("red", True), ("blue", False)]


def test_disk_cache_on_gs_is_rewritten_every_n_verdicts_and_on_close(server, gcs):  # noqa: F811
  """gs:// cannot append: new verdicts wait in memory; after `cache_flush_every` of them, and on close(), the object
  is rewritten with every verdict; a new client reads it back."""
  path = f"{gcs}/judge_cache.jsonl"
  judge = make_judge(server, cache_path=path, cache_flush_every=3)
  judge.judge(QUESTION, "red", GT)
  judge.judge(QUESTION, "blue", GT)
  assert not epath.Path(path).exists()  # two verdicts: not written yet
  judge.judge(QUESTION, "green", GT)
  assert _cache_rows(path) == [("red", True), ("blue", False), ("green", False)]
  judge.judge(QUESTION, "umbrella red", GT)
  assert len(_cache_rows(path)) == 3
  judge.close()
  assert _cache_rows(path)[-1] == ("umbrella red", True)
  judge.close()  # nothing new: no rewrite
  server.stop()
  again = make_judge(server, cache_path=path, max_retries=0)
  assert [again.judge(QUESTION, a, GT) for a in ("red", "blue", "green", "umbrella red")] == [True, False, False, True]
  assert again.metrics()["disk_cache_loaded"] == 4 and len(server.chat_requests) == 4


def test_disk_cache_on_gs_under_concurrent_verdicts_keeps_each_once(server, gcs):  # noqa: F811
  path = f"{gcs}/judge_cache.jsonl"
  with make_judge(server, cache_path=path, cache_flush_every=2, max_workers=8) as judge:
    colors = [f"color{i}" for i in range(13)]
    assert judge.judge_many([(QUESTION, c, GT) for c in colors]) == [False] * 13
  assert sorted(a for a, _ in _cache_rows(path)) == sorted(colors)  # the with block closed it: all 13, once each


def test_disk_cache_failures_are_warnings(server, gcs, caplog):  # noqa: F811
  """A cache that cannot be read starts empty; one that cannot be written keeps its verdicts for the next flush."""
  caplog.set_level(logging.WARNING, logger=J.__name__)
  path = f"{gcs}/judge_cache.jsonl"
  cls = type(epath.Path(path))

  def broken(*args, **kwargs):
    raise OSError("the bucket said no")

  with pytest.MonkeyPatch.context() as mp:  # its own: undoing it leaves the fake bucket in place
    mp.setattr(cls, "exists", broken)
    judge = make_judge(server, cache_path=path, cache_flush_every=1)
  assert "cannot read the cache" in caplog.text and judge.metrics()["disk_cache_loaded"] == 0
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(cls, "write_bytes", broken)
    assert judge.judge(QUESTION, "red", GT) is True  # the verdict, whatever the cache
    assert judge.metrics()["disk_cache_write_failures"] == 1 and "cannot write the cache" in caplog.text
    assert judge.judge(QUESTION, "blue", GT) is False  # a failing store is retried with the next verdict(s)
    assert judge.metrics()["disk_cache_write_failures"] == 2
  judge.flush()  # the verdicts that failed to be written are written now
  assert _cache_rows(path) == [("red", True), ("blue", False)]
  local = make_judge(server, cache_path="/nonexistent-dir/judge_cache.jsonl")
  assert local.judge(QUESTION, "blue", GT) is False and local.metrics()["disk_cache_write_failures"] == 1


# --- outages -------------------------------------------------------------------------------------------------
def test_fallback_to_rules_when_the_server_is_down(server, caplog):
  caplog.set_level(logging.WARNING, logger=J.__name__)
  judge = make_judge(server, max_retries=2)
  response = "<think>It looks red.</think>\n<answer>red</answer><|im_end|>"
  r = R.compute_reward("vstar", response, GT, num_successful_tool_calls=1, judge=judge, question=QUESTION)
  assert (r.acc, r.judged, r.total, r.details["judge"]) == (1.0, True, pytest.approx(2.0), "ok")
  server.stop()

  start = time.monotonic()
  crimson = "The umbrella is crimson."
  r = R.compute_reward("vstar", response, crimson, num_successful_tool_calls=1, judge=judge, question=QUESTION)
  assert (r.acc, r.judged, r.tool, r.details["judge"]) == (0.0, False, 0.0, "unavailable")  # rule: undecided -> 0
  r = R.compute_reward("vstar", "<answer>B</answer>", "B", num_successful_tool_calls=1, judge=judge)
  assert (r.acc, r.total) == (1.0, pytest.approx(2.0))  # the rules still work
  results = R.score_batch(
    [R.RewardItem("vstar", response, f"The umbrella is {c}.", 1, QUESTION) for c in ("blue", "green", "pink")],
    judge=judge,
  )
  assert [r.details["judge"] for r in results] == ["unavailable"] * 3
  assert time.monotonic() - start < 5
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()
  m = judge.metrics()
  assert m["fallbacks"] == 4 and m["outages"] == 1 and m["skipped_during_outage"] == 3
  assert m["requests"] == 1 + 3  # one verdict, then 1 + max_retries refused connections; the rest skipped


def test_one_warning_per_outage(server, caplog):
  caplog.set_level(logging.WARNING, logger=J.__name__)
  judge = make_judge(server, max_retries=0, outage_cooldown_s=0)
  server.fail("500", 3)
  assert judge.judge(QUESTION, "red", GT) is None
  assert judge.judge(QUESTION, "blue", GT) is None
  assert judge.judge(QUESTION, "green", GT) is None
  assert not judge.available
  assert judge.judge(QUESTION, "red", GT) is True  # recovered
  assert judge.available
  server.fail("500", 1)
  assert judge.judge(QUESTION, "pink", GT) is None  # a second outage
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 2
  assert judge.metrics()["outages"] == 2


def test_score_batch_through_the_server(server):
  server.delay_s = 0.1
  judge = make_judge(server, max_workers=8)
  colors = ["red", "blue", "green", "pink", "black", "white"]
  items = [
    {
      "data_source": "vstar",
      "response": f"<think>hm</think><answer>{c}</answer>",
      "ground_truth": GT,
      "num_successful_tool_calls": 1,
      "question": f"{QUESTION} ({i})",
    }
    for i, c in enumerate(colors * 2)
  ]
  results = R.score_batch(items, judge=judge, max_workers=6)
  assert [r.total for r in results] == [pytest.approx(2.0) if c == "red" else 0.0 for c in colors * 2]
  assert all(r.judged for r in results)
  assert len(server.chat_requests) == 12 and server.max_active >= 2
