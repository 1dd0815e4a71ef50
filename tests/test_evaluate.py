"""Evaluation: prompts and option shuffling, rule-then-judge scoring, and the resumable end-to-end run of a tiny model
on a generated V*-layout benchmark (in-process with a scripted policy, and as a CLI killed midway then resumed)."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest
from benchmark_fixtures import write_vstar

from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.rollout import AgentConfig, run_rollouts
from deepeyes_jax.data import benchmarks as bm
from deepeyes_jax.eval import loop, runner, scoring
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.processing.tokenizer import load_tokenizer
from deepeyes_jax.reward.judge import Judge
from deepeyes_jax.sampling import rules
from deepeyes_jax.sampling.sampler import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _item(item_id="c/x", options=("red", "blue", "green", "white"), answer_index=0, category="c"):
  return bm.BenchmarkItem(
    item_id=item_id,
    benchmark="vstar",
    category=category,
    question="What is the color of the cup?",
    answer=options[answer_index],
    answer_index=answer_index,
    options=list(options),
    image=b"",
  )


def _shown_letter(user_text: str, option: str) -> str:
  """The letter the prompt shows next to `option` (read from the rendered text, not from the code's mapping)."""
  (letter,) = re.findall(rf"\n([A-Z])\. {re.escape(option)}\n", user_text)
  return letter


class FakeJudge:
  def __init__(self, verdict):
    self.verdict, self.asked = verdict, []

  def judge(self, question, answer, ground_truth):
    self.asked.append((question, answer, ground_truth))
    return self.verdict


# ----------------------------------------------------------------------------------------------------------------
# Prompts, shuffling, scoring


def test_eval_prompt_is_the_spec_text_and_unshuffled_keeps_release_order():
  shown = scoring.show(_item(), shuffle=False)
  assert shown.user_text == (
    "Question: What is the color of the cup?\nOptions: \nA. red\nB. blue\nC. green\nD. white\n\n" + prompts.USER_SUFFIX
  )
  assert shown.system_prompt == prompts.SYSTEM_PROMPT and shown.ground_truth == "A"  # V*'s original: always A


def test_shuffled_options_map_back_to_the_correct_answer():
  letters = []
  for i in range(40):
    item = _item(item_id=f"c/{i}", answer_index=i % 4)
    shown = scoring.show(item, seed=3, shuffle=True)
    letter = _shown_letter(shown.user_text, item.answer)
    letters.append(letter)
    assert sorted(shown.options) == sorted(item.options)
    assert scoring.score_answer(letter, shown) == scoring.Verdict(True, "rule")
    assert scoring.score_answer(f"({letter}) {item.answer}", shown).correct
    assert scoring.score_answer(item.answer, shown).correct  # the option's text without its letter
    wrong = next(o for o in item.options if o != item.answer)
    assert scoring.score_answer(_shown_letter(shown.user_text, wrong), shown) == scoring.Verdict(False, "rule")
    assert scoring.score_answer(wrong, shown).correct is False
    assert scoring.show(item, seed=3, shuffle=True) == shown  # deterministic per (seed, item id)
  assert 4 <= letters.count("A") <= 20  # spread over the letters, unlike the release order
  assert any(scoring.show(_item(f"c/{i}"), seed=4).order != scoring.show(_item(f"c/{i}"), seed=3).order
             for i in range(10))  # fmt: skip


def test_judge_decides_only_what_the_rule_cannot():
  shown = scoring.show(_item(), shuffle=False)
  fake = FakeJudge(True)
  assert isinstance(fake, Judge)
  assert scoring.score_answer("B", shown, fake) == scoring.Verdict(False, "rule") and fake.asked == []
  assert scoring.score_answer("a crimson one", shown, fake) == scoring.Verdict(True, "judge")
  (question, answer, truth) = fake.asked[0]
  assert answer == "a crimson one" and truth == "A. red" and "B. blue" in question
  assert scoring.score_answer("a crimson one", shown, FakeJudge(None)) == scoring.Verdict(False, "undecided")
  assert scoring.score_answer("a crimson one", shown, None) == scoring.Verdict(False, "undecided")
  assert scoring.score_answer(None, shown, fake) == scoring.Verdict(False, "no_answer")


def test_yes_no_and_no_tool_answers():
  pope = bm.BenchmarkItem("adversarial/1", "pope", "adversarial", "Is there a dog in the image?", "yes", b"")
  shown = scoring.show(pope)
  assert shown.user_text == "\nIs there a dog in the image?" + prompts.USER_SUFFIX
  assert scoring.score_answer("Yes, there is a dog.", shown).correct
  assert not scoring.score_answer("No.", shown).correct
  no_tool = scoring.show(_item(), shuffle=False, no_tool=True)
  assert no_tool.system_prompt == "You are a helpful assistant." and "image_zoom_in_tool" not in no_tool.user_text
  assert no_tool.user_text.endswith("D. white\nAnswer with the option's letter from the given choices directly.")
  assert scoring.final_answer(None, "<think>hmm</think>A<|im_end|>", no_tool=True) == "A"
  assert scoring.final_answer(None, "A<|im_end|>", no_tool=False) is None  # the agent must use <answer>
  assert scoring.final_answer(" B ", "...", no_tool=False) == "B"


# ----------------------------------------------------------------------------------------------------------------
# End to end


ZOOM = (
  '<think>zoom</think>\n<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 10, 120, 100]}}'
  "\n</tool_call><|im_end|>"
)


def test_end_to_end_tiny_model_scripted(tmp_path, tiny_vlm):
  """Real sampler + crops + scoring; the policy is scripted so the expected accuracy is known from the fixture:
  sa_1 zooms then answers the correct option's TEXT, sa_2 answers the letter the prompt shows for the correct
  option, sa_3 answers the letter of a wrong option."""
  items, report = bm.load_vstar(write_vstar(str(tmp_path / "vstar")))
  sampler = Sampler(qvl.from_pretrained(tiny_vlm[0], dtype=jnp.float32))
  tok = load_tokenizer(str(tiny_vlm[0]))
  agent = AgentConfig(max_total_tokens=1536, min_pixels=4 * 28 * 28, max_pixels=48 * 28 * 28, sampling=rules.GREEDY)
  correct_text = {"direct_attributes/sa_1": "red", "direct_attributes/sa_2": "wood", "relative_position/sa_3": "left"}

  def script(task):
    text = task.messages()[1]["content"][1]["text"]
    if task.task_id.endswith("sa_1"):
      return [ZOOM, "<think>ok</think> <answer>red</answer><|im_end|>"]
    if task.task_id.endswith("sa_2"):
      return [f"<answer>{_shown_letter(text, correct_text[task.task_id])}</answer><|im_end|>"]
    return [f"<answer>{_shown_letter(text, 'right')}</answer><|im_end|>"]

  calls = []

  def rollout_fn(tasks, k, seed):
    calls.append([t.task_id for t in tasks])
    return run_rollouts(
      sampler, tok, tasks, group_size=k, config=agent, seed=seed, scripted_turns=[script(t) for t in tasks]
    )

  settings = runner.EvalSettings(benchmark="vstar", seed=0, batch_size=2, checkpoint="tiny")
  out = str(tmp_path / "run")
  summary = runner.evaluate_benchmark(items, rollout_fn, out, settings, tokenizer=tok, load_report=report)
  assert calls == [["direct_attributes/sa_1", "direct_attributes/sa_2"], ["relative_position/sa_3"]]
  recs = [json.loads(x) for x in open(os.path.join(out, "results.jsonl"))]
  assert [(r["item_id"], r["greedy_correct"]) for r in recs] == [
    ("direct_attributes/sa_1", True), ("direct_attributes/sa_2", True), ("relative_position/sa_3", False)
  ]  # fmt: skip
  s1 = recs[0]["samples"][0]
  assert s1["successful_tool_calls"] == 1 and s1["turns"] == 2 and s1["answer"] == "red" and s1["how"] == "rule"
  assert summary["by_category"]["direct_attributes"]["greedy"] == 1.0
  assert summary["by_category"]["relative_position"]["greedy"] == 0.0
  assert set(summary["overall"]) == set(loop.SUMMARY_KEYS)
  assert summary["overall"]["greedy"] == pytest.approx(2 / 3)  # fractions in summary.json, percent in summary.md
  assert summary["overall"]["tool_calls_per_traj"] == pytest.approx(1 / 3)
  trajs = [json.loads(x)["task_id"] for x in open(os.path.join(out, "trajectories.jsonl"))]
  assert sorted(trajs) == sorted(correct_text)
  md = open(os.path.join(out, "summary.md")).read()
  assert "| direct_attributes | 2 | 100.0 |" in md and "| DeepEyes-7B | 90.1 |" in md and "| this run | 66.7 |" in md
  # A second run finds everything done: no rollout, same tables.
  calls.clear()
  again = runner.evaluate_benchmark(items, rollout_fn, out, settings, tokenizer=tok, load_report=report)
  assert calls == [] and again["overall"] == summary["overall"]
  with pytest.raises(ValueError, match="other settings"):
    runner.evaluate_benchmark(items, rollout_fn, out, runner.EvalSettings(benchmark="vstar", seed=1, checkpoint="tiny"))


def _cli(config_args, kill=None):
  launcher = [os.path.join(ROOT, "tests", "kill_hooks.py"), kill] if kill else ["-m"]  # kill: SIGKILL it there
  cmd = [sys.executable, *launcher, "deepeyes_jax.evaluate", *config_args]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_cli_killed_midway_resumes_without_redoing_items(tmp_path, tiny_vlm):
  data = write_vstar(str(tmp_path / "vstar"))
  out = tmp_path / "run"
  args = [
    f"--config={ROOT}/configs/eval_vstar.py:size=tiny", f"--config.checkpoint={tiny_vlm[0]}",
    f"--config.data_path={data}", f"--config.out_dir={out}",
  ]  # fmt: skip
  killed = _cli(args, kill="items=1")  # SIGKILL after the first batch (2 items) is written
  assert killed.returncode == -9, killed.stderr[-3000:]
  first = (out / "results.jsonl").read_text().splitlines()
  assert [json.loads(x)["item_id"] for x in first] == ["direct_attributes/sa_1", "direct_attributes/sa_2"]
  assert not (out / "summary.json").exists()
  resumed = _cli(args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming: 2 of 3 items already done, 1 to go" in resumed.stdout
  lines = (out / "results.jsonl").read_text().splitlines()
  assert lines[:2] == first and json.loads(lines[2])["item_id"] == "relative_position/sa_3"
  trajs = [json.loads(x)["task_id"] for x in (out / "trajectories.jsonl").read_text().splitlines()]
  assert sorted(trajs) == sorted(json.loads(x)["item_id"] for x in lines)  # each item rolled out exactly once
  summary = json.loads((out / "summary.json").read_text())
  assert summary["overall"]["items"] == 3 and summary["settings"]["shuffle_options"] is True
  assert "| DeepEyes-7B | 90.1 |" in (out / "summary.md").read_text()
  assert "items 3/3" in resumed.stdout and "ETA" in resumed.stdout


def test_resume_drops_a_torn_line_and_orphan_trajectories(tmp_path):
  good = json.dumps({"item_id": "a", "category": "c", "error": None}) + "\n"
  (tmp_path / "results.jsonl").write_text(good + '{"item_id": "b", "categ')  # killed mid-write
  (tmp_path / "trajectories.jsonl").write_text(
    json.dumps({"task_id": "a"}) + "\n" + json.dumps({"task_id": "b"}) + "\n"
  )
  done = runner.read_done(str(tmp_path))
  assert list(done) == ["a"]
  assert (tmp_path / "results.jsonl").read_text() == good
  assert [json.loads(x)["task_id"] for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()] == ["a"]


def test_resume_refuses_changed_rollout_settings_naming_the_field(tmp_path):
  """A resumed evaluation must use the settings that made its first items: turns, token budgets, dtype, ... A
  change is refused naming the config field; engine knobs (slots, pages) change no numbers and may change."""
  import importlib.util

  from deepeyes_jax.evaluate import settings

  spec = importlib.util.spec_from_file_location("eval_vstar", os.path.join(ROOT, "configs", "eval_vstar.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("size=tiny")
  config.checkpoint = str(tmp_path / "ckpt")
  first = settings(config)
  runner._check_settings(tmp_path, first)  # writes run_config.json
  config.rollout.segment_steps, config.rollout.max_concurrent_rows = 4, 2
  runner._check_settings(tmp_path, settings(config))  # engine knobs: accepted
  config.rollout.max_turns = 2
  with pytest.raises(ValueError, match=r"rollout\.max_turns: 3 -> 2"):
    runner._check_settings(tmp_path, settings(config))
  config.rollout.max_turns, config.dtype = 3, "bfloat16"
  with pytest.raises(ValueError, match=r"dtype: 'float32' -> 'bfloat16'"):
    runner._check_settings(tmp_path, settings(config))
  old = {k: v for k, v in first.pinned().items() if k not in ("dtype", "rollout")}  # an older run_config.json
  (tmp_path / "run_config.json").write_text(json.dumps(old))
  runner._check_settings(tmp_path, settings(config))  # what it did not record is not compared


# ----------------------------------------------------------------------------------------------------------------
# POPE: precision / recall / F1 / yes-ratio, items skipped at load, no options in the header


def test_pope_summary_yes_no_metrics_and_load_skips(tmp_path, tiny_vlm):
  """A scripted policy on a hand-made POPE set; every number below is counted by hand ("yes" positive).

  adversarial (write_pope: labels yes, no, yes, no): answers "Yes, there is." (TP), "yes" (FP), "No." (FN), "no"
  (TN) -> precision 1/2, recall 1/2, F1 1/2, yes-ratio 2/4. popular (labels yes, no, yes): "Yes" (TP), no answer
  (a "no" prediction: TN), "I think so" (neither: a "no" prediction, FN) -> precision 1/1, recall 1/2, F1 2/3,
  yes-ratio 1/3, 2 not yes/no. Overall TP 2, FP 1, TN 2, FN 2 -> precision 2/3, recall 1/2, F1 4/7, yes-ratio 3/7.
  Two more popular lines are skipped at load (a bad label, a missing image)."""
  from benchmark_fixtures import write_pope

  root = tmp_path / "pope"
  _, img_dir = write_pope(str(root), n=4)
  with open(root / "coco_pope_popular.json", "w") as f:
    for qid, label in ((1, "yes"), (2, "no"), (3, "yes")):
      rec = {"question_id": qid, "image": f"COCO_val2014_{qid:012d}.jpg", "text": f"Is there a cat{qid}?"}
      f.write(json.dumps({**rec, "label": label}) + "\n")
    f.write(json.dumps({"question_id": 4, "image": "COCO_val2014_000000000001.jpg", "text": "?", "label": "maybe"}))
    f.write("\n" + json.dumps({"question_id": 5, "image": "absent.jpg", "text": "Is there a cup?", "label": "no"}))
  items, report = bm.load_pope(str(root), img_dir)
  assert len(items) == 7 and report.skipped == 2
  said = {
    "adversarial/1": "Yes, there is.", "adversarial/2": "yes", "adversarial/3": "No.", "adversarial/4": "no",
    "popular/1": "Yes", "popular/2": None, "popular/3": "I think so",
  }  # fmt: skip
  sampler = Sampler(qvl.from_pretrained(tiny_vlm[0], dtype=jnp.float32))
  tok = load_tokenizer(str(tiny_vlm[0]))
  agent = AgentConfig(max_total_tokens=1536, min_pixels=4 * 28 * 28, max_pixels=48 * 28 * 28, sampling=rules.GREEDY)

  def turn(task):
    answer = said[task.task_id]
    return ["<think>hmm</think><|im_end|>" if answer is None else f"<answer>{answer}</answer><|im_end|>"]

  def rollout_fn(tasks, k, seed):
    return run_rollouts(
      sampler, tok, tasks, group_size=k, config=agent, seed=seed, scripted_turns=[turn(t) for t in tasks]
    )

  out = tmp_path / "run"
  settings = runner.EvalSettings(benchmark="pope", seed=0, batch_size=4, checkpoint="tiny")
  summary = runner.evaluate_benchmark(items, rollout_fn, str(out), settings, tokenizer=tok, load_report=report)
  recs = {r["item_id"]: r for r in map(json.loads, open(out / "results.jsonl"))}
  assert {i: r["samples"][0]["answer"] for i, r in recs.items()} == said
  assert summary["overall"]["items"] == 7 and summary["overall"]["skipped"] == 2  # the load report's skips
  # both skipped lines are popular ones (the file's name says so): counted in that category too
  assert {c: row["skipped"] for c, row in summary["by_category"].items()} == {"adversarial": 0, "popular": 2}
  assert summary["load_report"]["by_category"] == {"popular": 2}
  assert summary["overall"]["accuracy"] == pytest.approx(3 / 7)  # adversarial/1, adversarial/4, popular/1
  assert summary["has_options"] is False
  yn = summary["yes_no"]
  expect = {
    "adversarial": dict(samples=4, tp=1, fp=1, tn=1, fn=1, not_yes_no=0, precision=1 / 2, recall=1 / 2, f1=1 / 2,
                        yes_ratio=2 / 4),
    "popular": dict(samples=3, tp=1, fp=0, tn=1, fn=1, not_yes_no=2, precision=1.0, recall=1 / 2, f1=2 / 3,
                    yes_ratio=1 / 3),
    "overall": dict(samples=7, tp=2, fp=1, tn=2, fn=2, not_yes_no=2, precision=2 / 3, recall=1 / 2, f1=4 / 7,
                    yes_ratio=3 / 7),
  }  # fmt: skip
  got = {**yn["by_category"], "overall": yn["overall"]}
  assert set(got) == set(expect)
  for cat, want in expect.items():
    assert got[cat] == pytest.approx(want), cat
  md = (out / "summary.md").read_text()
  assert "seed 0, greedy, zoom tool" in md and "option" not in md.split("\n\n")[1]  # POPE shows no options
  assert "| category | samples | precision % | recall % | F1 % | yes-ratio % | not yes/no |" in md
  assert "| adversarial | 4 | 50.0 | 50.0 | 50.0 | 50.0 | 0 |" in md
  assert "| popular | 3 | 100.0 | 50.0 | 66.7 | 33.3 | 2 |" in md
  assert "| **overall** | 7 | 66.7 | 50.0 | 57.1 | 42.9 | 2 |" in md
  assert 'counts as a "no" prediction' in md
  overall_row = next(x for x in md.splitlines() if x.startswith("| **overall** | 7 | 42.9"))
  assert overall_row.endswith("| 2 |")  # the skipped column: the two items skipped at load
  assert next(x for x in md.splitlines() if x.startswith("| popular | 3 |")).endswith("| 2 |")
  assert "2 items skipped when loading (bad_field 1, missing_file 1), counted in `skipped`;" in md
  assert "| this run | 42.9 |" in md


def test_summary_header_names_option_order_only_when_options_are_shown():
  rec = {"item_id": "c/x", "category": "c", "options_shown": ["red", "blue"], "ground_truth": "A", "error": None}
  sample = dict.fromkeys(loop.SAMPLE_KEYS, 0) | {"answer": "A", "correct": True, "how": "rule", "zoom_ious": []}
  rec |= loop.item_record("c/x", [sample | {"error": None}])
  unshuffled = runner.EvalSettings(benchmark="hrbench_4k", shuffle_options=False, checkpoint="x")
  md = runner.summary_markdown(runner.summarize([rec], unshuffled))
  assert "options in release order" in md and "| this run (options unshuffled) | 100.0 |" in md
  shuffled = dataclasses.replace(unshuffled, shuffle_options=True)
  assert "options shuffled" in runner.summary_markdown(runner.summarize([rec], shuffled))
  open_rec = {**rec, "options_shown": []}
  md = runner.summary_markdown(runner.summarize([open_rec], unshuffled))
  assert "option" not in md and "yes_no" not in runner.summarize([open_rec], unshuffled)


# ----------------------------------------------------------------------------------------------------------------
# Items skipped at load, by category


def test_loaders_count_skipped_items_by_the_category_they_would_have_had(tmp_path):
  """V*: the sub-directory; HR-Bench: the row's category column (not for a row with the wrong number of fields);
  POPE: the record's category, else the file name's (not for a line that is not JSON in a file naming none);
  DeepEyes: the record's data_source."""
  from benchmark_fixtures import hrbench_rows, write_pope, write_tsv

  root = write_vstar(str(tmp_path / "vstar"))
  os.remove(os.path.join(root, "direct_attributes", "sa_1.json"))
  with open(os.path.join(root, "relative_position", "sa_3.jpg"), "wb") as f:
    f.write(b"not a jpeg")
  _, report = bm.load_vstar(root)
  assert report.skipped == 2 and report.by_category == {"direct_attributes": 1, "relative_position": 1}

  rows = hrbench_rows(4)  # categories single, cross, single, cross
  rows[0][2] = "E"  # a bad answer: single
  rows[1][-1] = "!!!"  # not base64: cross
  rows.append(rows[3][:5])  # a short row: its category column is not there
  _, report = bm.load_hrbench(write_tsv(str(tmp_path / "hr_bench_4k.tsv"), rows))
  assert report.skipped == 3 and report.by_category == {"single": 1, "cross": 1}

  path, img_dir = write_pope(str(tmp_path / "pope"), n=2)  # coco_pope_adversarial.json
  with open(path, "a") as f:
    f.write("not json\n")  # the file's category
    f.write(json.dumps({"question_id": 7, "image": "x.jpg", "text": "?", "label": "yes", "category": "random"}) + "\n")
  other = os.path.join(os.path.dirname(path), "extra_questions.json")  # a name that names no category
  with open(other, "w") as f:
    f.write("{torn\n")  # unreadable: overall only
    f.write(json.dumps({"question_id": 8, "image": "x.jpg", "text": "?", "label": "maybe"}) + "\n")  # "all"
  _, report = bm.load_pope(os.path.dirname(path), img_dir)
  assert report.skipped == 4 and report.by_category == {"adversarial": 1, "random": 1, "all": 1}

  records = [{"data_source": "vstar", "prompt": "not a list"}, {"data_source": 3, "prompt": []}]
  jsonl = tmp_path / "de.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
  items, report = bm.load_deepeyes(str(jsonl))
  assert items == [] and report.skipped == 2 and report.by_category == {"vstar": 1}


def test_summary_counts_load_skips_per_category_and_says_which_are_overall_only():
  def record(item_id, category, correct):
    sample = dict.fromkeys(loop.SAMPLE_KEYS, 0) | {"answer": "A", "correct": correct, "how": "rule", "zoom_ious": []}
    rec = {"item_id": item_id, "category": category, "options_shown": ["a", "b"], "ground_truth": "A"}
    return rec | loop.item_record(item_id, [sample | {"error": None}])

  records = [record("single/1", "single", True), record("single/2", "single", False)]
  report = bm.LoadReport("hrbench_4k", "x.tsv", items=2)
  report.skip("x.tsv:3", bm.BAD_IMAGE, "not base64", category="single")
  report.skip("x.tsv:4", bm.BAD_IMAGE, "not base64", category="cross")  # every cross item was skipped
  report.skip("x.tsv:5", bm.BAD_FIELD, "row has 5 fields")  # category unreadable
  settings = runner.EvalSettings(benchmark="hrbench_4k", checkpoint="x")
  summary = runner.summarize(records, settings, report)
  assert {c: (row["items"], row["skipped"]) for c, row in summary["by_category"].items()} == {
    "cross": (0, 1), "single": (2, 1)
  }  # fmt: skip
  assert summary["overall"]["skipped"] == 3 and summary["overall"]["accuracy"] == 0.5
  md = runner.summary_markdown(summary)
  assert next(x for x in md.splitlines() if x.startswith("| cross | 0 |")).endswith("| 1 |")
  assert next(x for x in md.splitlines() if x.startswith("| **overall** | 2 |")).endswith("| 3 |")
  assert "3 items skipped when loading (bad_field 1, bad_image 2), counted in `skipped` (1 in the overall row " in md
