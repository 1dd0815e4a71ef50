"""Tool-use-oriented data selection with a scripted policy: exactly the items that should survive are kept, with
the right reasons and statistics; the kept records round-trip through parquet."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from benchmark_fixtures import image

from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.rollout import AgentConfig
from deepeyes_jax.agent.trajectory import ToolRecord, Trajectory, Turn
from deepeyes_jax.data.deepeyes import DeepEyesSource, decode_example, write_deepeyes_parquet
from deepeyes_jax.eval import scoring
from deepeyes_jax.eval import selection as sel
from deepeyes_jax.eval import tasks as tasks_lib
from deepeyes_jax.eval.loop import agent_rollouts
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.processing.tokenizer import load_tokenizer
from deepeyes_jax.sampling import rules
from deepeyes_jax.sampling.sampler import Sampler
from deepeyes_jax.select import load_records

K = 4
BOX = [40, 30, 140, 110]
# uid index -> correct answers out of K per mode (tool, no_tool, crop), and whether the item has a box.
PLAN = {
  0: ((0, 0, 0), True),  # never solved
  1: ((4, 4, 4), True),  # always solved
  2: ((2, 0, 3), True),  # fails without the tool, solved with the crop: KEEP
  3: ((2, 3, 4), True),  # solved without the tool (3/4 > 0.5)
  4: ((1, 0, 1), True),  # the crop does not help (1/4 < 0.5)
  5: ((3, 0, 0), False),  # no ground-truth box
}


def _records():
  out = []
  for i, ((_, _, _), has_box) in PLAN.items():
    q = f"What is the color of object {i}?"
    extra = {"question": q, "answer": "red", "index": i}
    if has_box:
      extra["bbox"] = BOX
    out.append({
      "data_source": "vstar",
      "prompt": [{"role": "system", "content": prompts.SYSTEM_PROMPT},
                 {"role": "user", "content": "<image>\n" + q + prompts.USER_SUFFIX}],
      "images": [image(i, (200, 150))],
      "reward_model": {"ground_truth": "red", "style": "model"},
      "extra_info": extra,
      "ability": "perception",
      "env_name": "visual_toolbox_v2",
    })  # fmt: skip
  return out


class TextTokenizer:
  """Decodes the token ids of a scripted trajectory: each id is the index of a whole response text."""

  def __init__(self):
    self.texts = ["<prompt>"]

  def encode(self, text: str) -> list[int]:
    self.texts.append(text)
    return [len(self.texts) - 1]

  def decode(self, ids, skip_special_tokens=False):
    return "".join(self.texts[i] for i in ids)


def _trajectory(task, sample: int, text: str, crops: int, tok: TextTokenizer) -> Trajectory:
  ids = np.asarray([0, *tok.encode(text)], np.int32)
  ok = ToolRecord(turn=0, content="{}", name="image_zoom_in_tool", bbox_given=BOX, bbox=BOX, status="ok", error=None)
  return Trajectory(
    uid=f"{task.task_id}/{sample}", task_id=task.task_id, sample_index=sample, token_ids=ids,
    action_mask=np.asarray([0, 1], np.int8), logprobs=np.zeros(2, np.float32),
    position_ids=np.zeros((3, 2), np.int32), images=[task.image], grids=np.ones((1, 3), np.int64), prompt_length=1,
    turns=[Turn(text=text, num_tokens=1, stop="stop_token", kind="answer")], tool_calls=[ok] * crops,
    answer=None, stop_reason="answer", image_min_pixels=0, image_max_pixels=0, metadata=dict(task.metadata),
  )  # fmt: skip


class ScriptedPolicy:
  """Rollout functions answering `red` (correct) for the first n of K samples and `blue` otherwise, n from PLAN;
  records every call. ``tool`` is the multi-turn agent, ``one_turn`` the no-tool / crop conditions."""

  def __init__(self):
    self.calls, self.tok = [], TextTokenizer()

  def tool(self, tasks, k, seed):
    return self._sample(tasks, k, seed, one_turn=False)

  def one_turn(self, tasks, k, seed):
    return self._sample(tasks, k, seed, one_turn=True)

  def _sample(self, tasks, k, seed, one_turn):
    out = []
    for t in tasks:
      images = [c["image"] for c in t.messages()[1]["content"] if isinstance(c, dict) and c.get("type") == "image"]
      mode = "tool" if not one_turn else "crop" if len(images) == 2 else "no_tool"
      if mode == "crop":
        assert images[1].size == (BOX[2] - BOX[0], BOX[3] - BOX[1])
      if one_turn:
        assert "image_zoom_in_tool" not in json.dumps(t.messages()[0])
      n = PLAN[int(t.task_id.split("-")[1])][0][tasks_lib.MODES.index(mode)]
      if mode == "tool":
        texts = ["<think>zoom</think> <answer>red</answer><|im_end|>"] * n + ["<answer>blue</answer><|im_end|>"] * (
          k - n
        )
      else:
        texts = ["Red.<|im_end|>"] * n + ["It is blue<|im_end|>"] * (k - n)
      out += [_trajectory(t, i, x, 1 if mode == "tool" else 0, self.tok) for i, x in enumerate(texts)]
      self.calls.append((mode, t.task_id, seed))
    return out

  def select(self, examples, config):
    return sel.select(examples, self.tool, self.one_turn, self.tok, config)


@pytest.fixture()
def data(tmp_path):
  path = write_deepeyes_parquet(tmp_path / "in.parquet", _records())
  return load_records([str(path)])


def test_selection_keeps_exactly_the_tool_dependent_items(tmp_path, data):
  records, examples = data
  policy = ScriptedPolicy()
  decisions = policy.select(examples, sel.SelectionConfig(k=K, batch_size=4))
  got = {d.uid: (d.kept, d.reason, d.solved, d.solved_no_tool, d.solved_crop) for d in decisions}
  assert got == {
    "vstar-0": (False, "never_solved", 0, None, None),
    "vstar-1": (False, "always_solved", 4, None, None),
    "vstar-2": (True, "kept", 2, 0, 3),
    "vstar-3": (False, "solved_without_tool", 2, 3, 4),
    "vstar-4": (False, "crop_does_not_help", 1, 0, 1),
    "vstar-5": (True, "kept_no_box", 3, None, None),
  }
  # The tool-free conditions only ran on the survivors of the difficulty filter that have a box.
  assert [(m, uid) for m, uid, _ in policy.calls] == [
    *[("tool", f"vstar-{i}") for i in range(6)],
    *[("no_tool", f"vstar-{i}") for i in (2, 3, 4)],
    *[("crop", f"vstar-{i}") for i in (2, 3, 4)],
  ]
  assert {seed for m, _, seed in policy.calls if m == "crop"} == {2}  # seed + 2: its own samples
  text = sel.report(decisions)
  assert text.splitlines()[0] == "kept 2 of 6 items" and "  never_solved: 1" in text
  assert "KEEP vstar-2: kept (tool 2/4, no tool 0/4, with crop 3/4)" in text
  out, jsonl = sel.write_selection(records, decisions, str(tmp_path / "out" / "selected.parquet"))
  src = DeepEyesSource(out)
  kept = [src[i] for i in range(len(src))]
  assert [r["extra_info"]["index"] for r in kept] == [2, 5]
  assert kept[0]["selection"]["solved_crop"] == 3 and kept[1]["selection"]["reason"] == "kept_no_box"
  again = decode_example(kept[0], 0, source_name="out")  # still a valid DeepEyes record, image bytes intact
  assert again.messages == examples[2].messages and again.images[0].tobytes() == examples[2].images[0].tobytes()
  assert len(open(jsonl).read().splitlines()) == 6


def test_selection_options(data):
  _, examples = data
  no_filter = ScriptedPolicy().select(examples, sel.SelectionConfig(k=K, tool_filter=False))
  assert [d.uid for d in no_filter if d.kept] == ["vstar-2", "vstar-3", "vstar-4", "vstar-5"]
  drop_unboxed = ScriptedPolicy().select(examples, sel.SelectionConfig(k=K, missing_box="drop"))
  assert [d.uid for d in drop_unboxed if d.kept] == ["vstar-2"]
  assert next(d for d in drop_unboxed if d.uid == "vstar-5").reason == "no_box"
  with pytest.raises(ValueError, match="k must be >= 2"):
    sel.SelectionConfig(k=1)


def test_one_turn_rollouts_sample_k_responses_with_a_tiny_model(tiny_vlm, data):
  _, examples = data
  sampler = Sampler(qvl.from_pretrained(tiny_vlm[0], dtype=jnp.float32))
  agent = AgentConfig(max_tokens_per_turn=6, max_total_tokens=1024, min_pixels=4 * 28 * 28,
                      max_pixels=48 * 28 * 28, sampling=rules.SamplingParams(1.0))  # fmt: skip
  tok = load_tokenizer(str(tiny_vlm[0]))
  rollout_fn = agent_rollouts(sampler, tok, agent, one_turn=True)
  trajs = rollout_fn([tasks_lib.mode_task(examples[2], "crop")], 3, 0)
  assert [t.sample_index for t in trajs] == [0, 1, 2] and all(len(t.turns) == 1 for t in trajs)
  assert all(len(t.images) == 2 and t.num_successful_tool_calls == 0 for t in trajs)  # the image and the crop
  verdicts = scoring.RewardScorer(tok, plain=True, default="vstar")([], trajs)
  assert len(verdicts) == 3 and all(v.how in ("reward", "no_answer") for v in verdicts)


def test_select_cli_end_to_end(tmp_path, tiny_vlm, data):
  """The command docs/evaluation.md gives, against a tiny checkpoint: every record gets a decision, the report
  is printed, the kept records are a valid parquet."""
  src = tmp_path / "in.parquet"
  write_deepeyes_parquet(src, _records()[:3])
  out = tmp_path / "sel" / "selected.parquet"
  cmd = [
    sys.executable, "-m", "deepeyes_jax.select", f"--checkpoint={tiny_vlm[0]}", f"--data={src}", f"--out={out}",
    "--k=2", "--max_tokens_per_turn=4", "--max_total_tokens=1024", f"--max_pixels={48 * 28 * 28}",
    "--dtype=float32", "--mesh=1,1,1",
  ]  # fmt: skip
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "3 records read from 1 file(s), 0 bad record(s) skipped" in res.stdout
  assert "selection (tool): items 3/3" in res.stdout and "of 3 items" in res.stdout
  decisions = [json.loads(x) for x in open(tmp_path / "sel" / "selected.decisions.jsonl")]
  assert [d["uid"] for d in decisions] == ["vstar-0", "vstar-1", "vstar-2"]
  assert all(d["k"] == 2 and 0 <= d["solved"] <= 2 for d in decisions)
  kept = DeepEyesSource(str(out))
  assert len(kept) == sum(d["kept"] for d in decisions)
