"""Rewards against hand-worked values from the formulas of docs/reference.md (section "Reward")."""

import threading
import time

import pytest

from deepeyes_jax.agent.prompts import SUCCESS_OBSERVATION, error_observation
from deepeyes_jax.reward import rewards as R

# A successful crop observation exactly as the rollout writes it (4 image pads instead of a real count).
CROP = SUCCESS_OBSERVATION.replace("<|image_pad|>", "<|image_pad|>" * 4)
TOOL_CALL = (
  '<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 200, 220], "label": "car"}}\n'
  "</tool_call><|im_end|>"
)


def with_crop(final: str) -> str:
  """One zoom-in turn, its (successful) observation, then the final turn."""
  return "<think>The car is small, zoom in.</think>\n" + TOOL_CALL + CROP + final


def answer_turn(answer: str, think: str = "The car is red.") -> str:
  return f"<think>{think}</think>\n<answer>{answer}</answer><|im_end|>"


def vstar(response, gt="B", crops=0, **kw):
  return R.compute_reward("vstar", response, gt, num_successful_tool_calls=crops, **kw)


# --- hand-worked totals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["vstar", "chart"])
def test_visual_reward_hand_worked(source):
  correct_with_crop = R.compute_reward(source, with_crop(answer_turn("B")), "B", num_successful_tool_calls=1)
  assert (correct_with_crop.acc, correct_with_crop.fmt, correct_with_crop.tool) == (1.0, 0.0, 1.0)
  assert correct_with_crop.total == pytest.approx(0.8 + 0.0 + 1.2) == pytest.approx(2.0)
  assert correct_with_crop.answer == "B"

  correct_no_crop = R.compute_reward(source, answer_turn("B"), "B", num_successful_tool_calls=0)
  assert (correct_no_crop.acc, correct_no_crop.tool, correct_no_crop.total) == (1.0, 0.0, pytest.approx(0.8))

  wrong_with_crop = R.compute_reward(source, with_crop(answer_turn("C")), "B", num_successful_tool_calls=2)
  assert (wrong_with_crop.acc, wrong_with_crop.tool, wrong_with_crop.total) == (0.0, 0.0, 0.0)  # no tool bonus

  wrong_no_crop = R.compute_reward(source, answer_turn("C"), "B", num_successful_tool_calls=0)
  assert wrong_no_crop.total == 0.0


def test_tool_bonus_needs_a_successful_crop_not_just_a_call():
  # The call failed (error observation): zero successful crops -> no bonus even though the answer is right.
  response = "<think>zoom</think>\n" + TOOL_CALL + error_observation("ZOOM IN ARGUMENTS ARE INVALID") + answer_turn("B")
  r = vstar(response, crops=0)
  assert (r.acc, r.tool, r.total) == (1.0, 0.0, pytest.approx(0.8))
  with pytest.raises(ValueError, match="num_successful_tool_calls"):
    vstar(response, crops=-1)


FORMAT_BREAKERS = {
  # name: (response with a correct answer "B" that breaks exactly that rule, rule name)
  "think": ("<think>zoom<think>" + answer_turn("B"), "think_tags"),
  "vision": (answer_turn("B") + "<|vision_start|><|image_pad|>", "vision_tags"),
  "answer_tags": ("<think>ok</think>\n<answer>B</answer></answer><|im_end|>", "answer_tags"),
}


@pytest.mark.parametrize("name", sorted(FORMAT_BREAKERS))
def test_each_format_rule_costs_0_2_on_visual_sources(name):
  response, rule = FORMAT_BREAKERS[name]
  r = vstar(response)
  assert r.details["format_errors"] == [rule]
  assert (r.acc, r.fmt) == (1.0, -1.0)
  assert r.total == pytest.approx(0.8 - 0.2)
  r = vstar(with_crop(response), crops=1)
  assert r.details["format_errors"] == [rule]
  assert r.total == pytest.approx(0.8 - 0.2 + 1.2)


def test_answer_of_1000_chars_is_a_format_error_and_scores_no_accuracy():
  ok = "B" + " " * (R.MAX_ANSWER_CHARS - 3) + "x"  # 999 characters: allowed
  assert len(ok) == 999 and R.format_errors(answer_turn(ok)) == []
  long = "B" + " " * (R.MAX_ANSWER_CHARS - 3) + "xx"  # 1000 characters
  assert len(long) == 1000
  assert R.format_errors(answer_turn(long)) == ["answer_too_long"]
  r = vstar(answer_turn(long), crops=1)
  assert (r.acc, r.fmt, r.tool, r.total) == (0.0, -1.0, 0.0, pytest.approx(-0.2))
  m = R.compute_reward("thinklite_eureka", answer_turn("\\boxed{" + "1" * 1000 + "}"), "1", num_successful_tool_calls=0)
  assert (m.acc, m.fmt, m.total) == (0.0, -1.0, pytest.approx(-0.4))


def test_format_rules_in_detail():
  assert R.format_score(answer_turn("B")) == 0.0
  # A real crop observation carries the format suffix "<think>...</think> ... <answer>...</answer>": balanced.
  assert R.format_errors(with_crop(answer_turn("B"))) == []
  # Unbalanced answer tags BEFORE the last </think> do not count; after it they do.
  assert R.format_errors("<think>maybe <answer>A</think><answer>B</answer>") == []
  assert R.format_errors("<think>x</think><answer>B") == ["answer_tags"]
  # Several rules at once are all listed; the score is still -1.
  broken = "<think><think>x</think><|vision_end|><answer>B"
  assert R.format_errors(broken) == ["think_tags", "vision_tags", "answer_tags"]
  assert R.format_score(broken) == -1.0


# --- extraction ----------------------------------------------------------------------------------------------
def test_extract_answer():
  assert R.response_answer(answer_turn(" B. red car \n")) == "B. red car"
  assert R.response_answer("<answer>A</answer> then <answer>C</answer>") == "C"  # the last one
  assert R.response_answer("<answer>A</answer> <answer>C") is None  # the last one is not closed
  assert R.response_answer("<think>no answer</think>") is None
  # After a crop the model stopped: the only <answer> left is the observation's "<answer>...</answer>" suffix.
  assert "<answer>...</answer>" in CROP
  assert R.response_answer("<think>zoom</think>" + TOOL_CALL + CROP) is None
  assert R.response_answer(with_crop(answer_turn("D"))) == "D"


def test_extract_boxed():
  assert R.extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
  assert R.extract_boxed(r"first \boxed{1}, finally \boxed{x^{2}+\{1\}}") == r"x^{2}+\{1\}"
  assert R.extract_boxed(r"\boxed{3} and a cut-off \boxed{\frac{1}{") == "3"
  assert R.extract_boxed("no box") is None


# --- math ----------------------------------------------------------------------------------------------------
def math_response(answer: str, think: str = "half of one") -> str:
  return f"<think>{think}</think>\n<answer>The answer is \\boxed{{{answer}}}.</answer><|im_end|>"


def test_math_reward_hand_worked():
  assert R.math_verify_available()
  r = R.compute_reward("thinklite_eureka", math_response(r"\frac{1}{2}"), "0.5", num_successful_tool_calls=0)
  assert (r.acc, r.fmt, r.tool, r.answer) == (1.0, 0.0, 0.0, r"\frac{1}{2}")
  assert r.total == pytest.approx(1.2)
  assert r.details["matcher"] == "math_verify" and not r.judged
  # No tool bonus for math, even with crops.
  assert R.compute_reward("thinklite_eureka", math_response("1/2"), "0.5", num_successful_tool_calls=3).total == 1.2
  wrong = R.compute_reward("thinklite_eureka", math_response(r"\frac{1}{3}"), "0.5", num_successful_tool_calls=0)
  assert (wrong.acc, wrong.total) == (0.0, 0.0)
  # Each format failure costs 0.4.
  r = R.compute_reward("xince", "<think>" + math_response(r"\frac{1}{2}"), "0.5", num_successful_tool_calls=0)
  assert r.details["format_errors"] == ["think_tags"] and r.total == pytest.approx(1.2 - 0.4)
  r = R.compute_reward(
    "thinklite_eureka", math_response(r"\frac{1}{2}") + "<|vision_start|>", "0.5", num_successful_tool_calls=0
  )
  assert r.details["format_errors"] == ["vision_tags"] and r.total == pytest.approx(0.8)
  # No \boxed{}: the answer is missing -> acc 0.
  r = R.compute_reward("thinklite_eureka", answer_turn("0.5"), "0.5", num_successful_tool_calls=0)
  assert (r.answer, r.acc, r.details["rule"]) == (None, 0.0, "no_boxed")


def test_math_answer_is_the_last_box_after_thinking():
  response = r"<think>maybe \boxed{0.5}</think><answer>\boxed{2} no wait \boxed{3}</answer>"
  r = R.compute_reward("thinklite_eureka", response, "3", num_successful_tool_calls=0)
  assert (r.answer, r.acc) == ("3", 1.0)
  r = R.compute_reward("thinklite_eureka", response, "0.5", num_successful_tool_calls=0)
  assert (r.answer, r.acc) == ("3", 0.0)


@pytest.mark.parametrize(
  "answer, gt, expected",
  [
    (r"\frac{1}{2}", "0.5", True),
    ("0.5", r"\frac{1}{2}", True),
    (r"\dfrac{1}{2}", "1/2", True),
    ("x+1", "1+x", True),
    ("x-1", "x+1", False),
    (r"\{1,2\}", r"\{2,1\}", True),
    ("3.0", "3", True),
    ("4", "3", False),
  ],
)
def test_math_equal_with_math_verify(answer, gt, expected):
  assert R.math_equal(answer, gt) is expected


def test_math_equal_fallback_without_math_verify(monkeypatch):
  monkeypatch.setattr(R, "_mv_parse", None)
  monkeypatch.setattr(R, "_mv_verify", None)
  assert not R.math_verify_available()
  assert R.math_equal(r"\frac{1}{2}", "0.5")
  assert R.math_equal(r"$\dfrac{3}{4}$", "0.75")
  assert R.math_equal(r"72^\circ", "72")
  assert not R.math_equal(r"\frac{1}{3}", "0.5")
  assert not R.math_equal("x+1", "1+x")  # symbolic equivalence needs math-verify
  r = R.compute_reward("thinklite_eureka", math_response(r"\frac{1}{2}"), "0.5", num_successful_tool_calls=0)
  assert (r.total, r.details["matcher"]) == (pytest.approx(1.2), "fallback")


def test_math_equal_runs_off_the_main_thread():
  # math-verify's signal-based timeout only works in the main thread; elsewhere we call it without one.
  out = []
  t = threading.Thread(target=lambda: out.append((R.math_equal("x+1", "1+x"), R.math_equal("x-1", "x+1"))))
  t.start()
  t.join(timeout=20)
  assert out == [(True, False)]


# --- rule matching -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "answer, gt, expected",
  [
    ("B", "B", True),
    ("(B)", "B", True),
    ("B.", "B", True),
    ("b", "B", True),
    ("B. red car", "B", True),
    ("(B) red car", "B", True),
    ("The answer is B", "B", True),
    ("Answer: (B)", "B", True),
    ("**B**", "B", True),
    (r"\boxed{B}", "B", True),
    ("B", "(B) red car", True),
    ("red car", "B. red car", True),
    ("B. red car", "red car", True),
    ("C", "B", False),
    ("C. red car", "B", False),
    ("The answer is C", "B", False),
    ("A red car", "B", False),  # "A" is an article here, not an option
    ("red car", "B", False),  # no options known: cannot map the text to a letter
  ],
)
def test_match_choice(answer, gt, expected):
  assert R.match_choice(answer, gt) is expected


def test_match_choice_with_options_from_the_question():
  question = "Question: What is parked by the door?\nOptions: \nA. blue car\nB. red car\nC. bike\n"
  options = R.parse_options(question)
  assert options == {"A": "blue car", "B": "red car", "C": "bike"}
  assert R.match_choice("red car", "B", options)
  assert R.match_choice("The red car.", "B", options)
  assert not R.match_choice("blue car", "B", options)
  assert R.match_choice("B", "red car", options)
  assert R.rule_verdict("blue car", "B", question) is False  # a different option: certain mismatch
  assert R.rule_verdict("a red vehicle", "B", question) is None  # undecided: a judge may tell
  assert R.parse_options("Is it red?\nB. maybe") == {}  # lone lines are not an option list


@pytest.mark.parametrize(
  "answer, gt, expected",
  [
    ("red", "Red", True),
    ("The red car.", "red car", True),
    ("  left  side ", "Left side", True),
    ("3", "3.0", True),
    ("three", "3", True),
    ("1,000", "1000", True),
    ("1/2", "0.5", True),
    ("50%", "50", True),
    ("-2", "-2.0", True),
    ("No", "No, the door is closed.", True),
    ("yes", "Yes", True),
    ("Yes", "No, the door is closed.", False),
    ("3", "4", False),
    ("pink", "not pink", False),
    ("red", "The car is red.", False),  # containment is left to the judge
    ("", "red", False),
  ],
)
def test_match_short(answer, gt, expected):
  assert R.match_short(answer, gt) is expected


def test_rule_verdict_is_three_valued():
  assert R.rule_verdict("3", "4") is False  # certain: different numbers
  assert R.rule_verdict("yes", "No") is False
  assert R.rule_verdict("red", "The car is red.") is None  # undecided
  assert R.rule_verdict("The Red Car", "red car") is True


# --- judge interplay (a stand-in judge; the real client is tested in test_judge.py) --------------------------
class FakeJudge:
  def __init__(self, verdict):
    self.verdict = verdict
    self.calls = []
    self.lock = threading.Lock()
    self.active = self.max_active = 0

  def judge(self, question, answer, ground_truth):
    with self.lock:
      self.calls.append((question, answer, ground_truth))
      self.active += 1
      self.max_active = max(self.max_active, self.active)
    try:
      return self.verdict(answer, ground_truth) if callable(self.verdict) else self.verdict
    finally:
      with self.lock:
        self.active -= 1


def test_judge_only_asked_when_the_rule_cannot_decide():
  judge = FakeJudge(True)
  q = "What color is the car?"
  r = vstar(with_crop(answer_turn("red")), gt="The car is red.", crops=1, judge=judge, question=q)
  assert judge.calls == [(q, "red", "The car is red.")]
  assert (r.acc, r.judged, r.details["judge"], r.total) == (1.0, True, "ok", pytest.approx(2.0))

  judge = FakeJudge(True)
  r = vstar(answer_turn("B"), gt="B", judge=judge)  # rule match: no call
  assert (judge.calls, r.acc, r.judged, r.details["judge"]) == ([], 1.0, False, "not_needed")
  r = vstar(answer_turn("C"), gt="B", judge=judge)  # certain mismatch: no call
  assert (judge.calls, r.acc, r.details["rule"]) == ([], 0.0, "mismatch")

  judge = FakeJudge(False)
  r = vstar(with_crop(answer_turn("blue")), gt="The car is red.", crops=1, judge=judge, question=q)
  assert (r.acc, r.tool, r.total, r.judged) == (0.0, 0.0, 0.0, True)

  judge = FakeJudge(None)  # endpoint unavailable: the rule result (undecided -> 0) stands
  r = vstar(answer_turn("red"), gt="The car is red.", judge=judge, question=q)
  assert (r.acc, r.judged, r.details["judge"]) == (0.0, False, "unavailable")
  r = vstar(answer_turn("red"), gt="The car is red.", judge=None)
  assert (r.acc, r.details["judge"]) == (0.0, "none")


def test_math_never_asks_the_judge():
  judge = FakeJudge(True)
  r = R.compute_reward("thinklite_eureka", math_response("7"), "8", num_successful_tool_calls=0, judge=judge)
  assert (judge.calls, r.acc, r.details["judge"]) == ([], 0.0, "not_used")


# --- registry ------------------------------------------------------------------------------------------------
def test_registry_aliases_and_custom_reward():
  assert R.get_reward_fn("vstar") is R.get_reward_fn("chart") is R.get_reward_fn("vl_agent") is R.visual_reward
  assert R.get_reward_fn("thinklite_eureka") is R.get_reward_fn("xince") is R.math_reward
  assert R.get_reward_fn(" VStar ") is R.visual_reward  # case and spaces are forgiven

  seen = []

  @R.register_reward("unit_test_source")
  def custom(response, ground_truth, *, num_successful_tool_calls, judge, question):
    seen.append((response, ground_truth, num_successful_tool_calls, question))
    return R.RewardResult(total=7.0, acc=1.0, fmt=0.0, tool=0.0, answer="x")

  try:
    r = R.compute_reward("unit_test_source", "resp", 42, num_successful_tool_calls=2, question="q")
    assert r.total == 7.0 and r.details["data_source"] == "unit_test_source"
    assert seen == [("resp", "42", 2, "q")]  # the ground truth is passed as a string
    with pytest.raises(ValueError, match="already registered"):
      R.register_reward("unit_test_source")(lambda *a, **k: None)
    R.register_reward("unit_test_source", overwrite=True)(R.visual_reward)
    assert R.get_reward_fn("unit_test_source") is R.visual_reward
  finally:
    R.REWARD_FNS.unregister("unit_test_source")


def test_unknown_data_source():
  with pytest.raises(KeyError) as err:
    R.compute_reward("no_such_source", answer_turn("B"), "B", num_successful_tool_calls=0)
  message = str(err.value)
  assert "no_such_source" in message and "vstar" in message and "thinklite_eureka" in message
  with pytest.raises(R.UnknownDataSourceError, match="did you mean 'vstar'"):
    R.get_reward_fn("vstra")  # a typo gets the nearest source
  r = R.compute_reward("no_such_source", answer_turn("B"), "B", num_successful_tool_calls=1, default="vstar")
  assert r.total == pytest.approx(2.0) and r.details["data_source"] == "no_such_source"
  assert R.get_reward_fn("no_such_source", default=R.math_reward) is R.math_reward


# --- batches -------------------------------------------------------------------------------------------------
def test_score_batch_matches_compute_reward_and_asks_the_judge_concurrently():
  def verdict(answer, gt):
    time.sleep(0.2)  # long enough for the pool to overlap the calls
    return answer.lower() in gt.lower()

  judge = FakeJudge(verdict)
  q = "What color is the car?"
  items = []
  for i in range(12):
    ans = ["red", "blue", "B", "C"][i % 4]
    gt = "B" if ans in "BC" else "The car is red."
    items.append(R.RewardItem("vstar", with_crop(answer_turn(ans)), gt, num_successful_tool_calls=i % 2, question=q))
  items.append({"data_source": "thinklite_eureka", "response": math_response("0.5"), "ground_truth": r"\frac12"})
  results = R.score_batch(items, judge=judge, max_workers=4)
  # "red"/"blue" need the judge; the duplicates are asked once: two distinct questions in all.
  assert sorted(c[1] for c in judge.calls) == ["blue", "red"]
  expected = [
    R.compute_reward(
      it.data_source,
      it.response,
      it.ground_truth,
      num_successful_tool_calls=it.num_successful_tool_calls,
      judge=FakeJudge(lambda ans, gt: ans.lower() in gt.lower()),
      question=it.question,
    )
    for it in items[:-1]
  ]
  assert [r.total for r in results[:-1]] == [e.total for e in expected]
  assert [r.judged for r in results[:-1]] == [e.judged for e in expected]
  assert results[0].total == pytest.approx(0.8) and results[1].total == 0.0  # red, 0 crops / blue, 1 crop
  assert results[-1].total == pytest.approx(1.2)
  assert judge.max_active == 2  # both questions were in flight at once
  assert R.score_batch(items[:2], judge=None)[0].details["judge"] == "none"

  metrics = R.reward_metrics(results)
  assert metrics["acc"] == pytest.approx(sum(r.acc for r in results) / len(results))
  assert 0 < metrics["judged"] < 1 and metrics["judge_unavailable"] == 0
