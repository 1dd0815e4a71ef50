"""Tool-use-oriented data selection with a scripted policy: exactly the items that should survive are kept, with
the right reasons and statistics; the kept records round-trip through parquet."""

import json

import jax.numpy as jnp
import pytest
from benchmark_fixtures import image

from deepeyes_jax.agent import prompts
from deepeyes_jax.agent.rollout import AgentConfig
from deepeyes_jax.data import selection as sel
from deepeyes_jax.data.deepeyes import DeepEyesSource, decode_example, write_deepeyes_parquet
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.sampling import rules
from deepeyes_jax.sampling.generate import load_tokenizer
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


class ScriptedPolicy:
  """Answers `red` (correct) for the first n of K samples and `blue` otherwise, n from PLAN; records every call."""

  def __init__(self):
    self.calls = []

  def sample(self, tasks, k, seed, mode):
    self.calls.append((mode, [t.task_id for t in tasks], seed))
    out = []
    for t in tasks:
      n = PLAN[int(t.task_id.split("-")[1])][0][sel.MODES.index(mode)]
      if mode == "tool":
        texts = ["<think>zoom</think> <answer>red</answer><|im_end|>"] * n + ["<answer>blue</answer><|im_end|>"] * (
          k - n
        )
        out.append([sel.Response(x, num_successful_tool_calls=1) for x in texts])
      else:
        images = [c["image"] for c in t.messages()[1]["content"] if c["type"] == "image"]
        assert len(images) == (2 if mode == "crop" else 1)
        if mode == "crop":
          assert images[1].size == (BOX[2] - BOX[0], BOX[3] - BOX[1])
        assert "image_zoom_in_tool" not in json.dumps(t.messages()[0])
        out.append([sel.Response("Red.<|im_end|>")] * n + [sel.Response("It is blue<|im_end|>")] * (k - n))
    return out


@pytest.fixture()
def data(tmp_path):
  path = write_deepeyes_parquet(tmp_path / "in.parquet", _records())
  return load_records([str(path)])


def test_selection_keeps_exactly_the_tool_dependent_items(tmp_path, data):
  records, examples = data
  policy = ScriptedPolicy()
  decisions = sel.select(examples, policy, sel.SelectionConfig(k=K, batch_size=4))
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
  assert [(m, ids) for m, ids, _ in policy.calls] == [
    ("tool", ["vstar-0", "vstar-1", "vstar-2", "vstar-3"]),
    ("tool", ["vstar-4", "vstar-5"]),
    ("no_tool", ["vstar-2", "vstar-3", "vstar-4"]),
    ("crop", ["vstar-2", "vstar-3", "vstar-4"]),
  ]
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
  no_filter = sel.select(examples, ScriptedPolicy(), sel.SelectionConfig(k=K, tool_filter=False))
  assert [d.uid for d in no_filter if d.kept] == ["vstar-2", "vstar-3", "vstar-4", "vstar-5"]
  drop_unboxed = sel.select(examples, ScriptedPolicy(), sel.SelectionConfig(k=K, missing_box="drop"))
  assert [d.uid for d in drop_unboxed if d.kept] == ["vstar-2"]
  assert next(d for d in drop_unboxed if d.uid == "vstar-5").reason == "no_box"
  with pytest.raises(ValueError, match="k must be >= 2"):
    sel.SelectionConfig(k=1)


def test_agent_policy_samples_k_responses_with_a_tiny_model(tiny_vlm, data):
  _, examples = data
  sampler = Sampler(qvl.from_pretrained(tiny_vlm[0], dtype=jnp.float32))
  agent = AgentConfig(max_tokens_per_turn=6, max_total_tokens=1024, min_pixels=4 * 28 * 28,
                      max_pixels=48 * 28 * 28, sampling=rules.SamplingParams(1.0))  # fmt: skip
  policy = sel.AgentPolicy(sampler, load_tokenizer(str(tiny_vlm[0])), agent)
  groups = policy.sample([sel.plain_task(examples[2], with_crop=True)], 3, 0, "crop")
  assert len(groups) == 1 and len(groups[0]) == 3
  assert all(isinstance(r.text, str) and r.text and r.num_successful_tool_calls == 0 for r in groups[0])
