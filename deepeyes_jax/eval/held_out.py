"""Held-out evaluation during training: greedy rollouts on a test split, with and without the zoom tool.

The trainer runs it on the warm-start checkpoint and on the final one (``config.eval``); ``final_eval.json``
reports both. A thin caller of ``eval.loop.run`` with ``tasks.record_task`` / ``tasks.tags_no_tool_task`` and
``scoring.RewardScorer``: the metrics are ``loop.SUMMARY_KEYS`` (``accuracy`` is the reward's ``acc``, ``mean_iou``
uses the task's ``target_box``).

``tool=False`` ("tool disabled"): each question is asked with no tool offered (``prompts.no_tool_messages``: plain
system prompt, the question, an answer-format instruction) and a single assistant turn, so the model answers from
the global view only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import jax
from etils import epath

from deepeyes_jax.agent.rollout import AgentConfig, Task
from deepeyes_jax.agent.trajectory import Trajectory, save_trajectories
from deepeyes_jax.eval import loop, scoring
from deepeyes_jax.eval import tasks as tasks_lib
from deepeyes_jax.sampling import rules


def evaluate_tasks(
  sampler,
  tokenizer,
  tasks: Sequence[Task],
  *,
  agent_config: AgentConfig,
  tool: bool = True,
  batch_size: int = 64,
  log: Callable[[str], None] | None = print,
) -> tuple[dict[str, float], list[Trajectory]]:
  """Greedy rollouts of ``tasks`` (in batches of ``batch_size``) and their summary (``loop.SUMMARY_KEYS``)."""
  cfg = dataclasses.replace(agent_config, sampling=rules.GREEDY)
  trajs: list[Trajectory] = []

  def on_batch(items, tasks, batch_trajs, records):
    rolled = [r for r in records if r["samples"]]  # one sample each, in task order (skipped items have none)
    for t, rec in zip(batch_trajs, rolled, strict=True):
      t.metadata["correct"] = bool(rec["samples"][0]["correct"])
    trajs.extend(batch_trajs)

  records = loop.run(
    tasks,
    (lambda t: t) if tool else tasks_lib.tags_no_tool_task,
    loop.agent_rollouts(sampler, tokenizer, cfg, one_turn=not tool),
    scoring.RewardScorer(tokenizer),
    item_id=lambda t: t.task_id,
    batch_size=batch_size,
    label=f"  eval ({'tool' if tool else 'no tool'})",
    log_fn=log,
    on_batch=on_batch,
  )
  return loop.summarize(records), trajs


class HeldOut:
  """The held-out evaluation of ``config.eval`` (greedy, with and without the tool) at named checkpoints.

  ``make_tasks()``: the held-out tasks (built when first needed). Each result is written to
  ``workdir/eval/NAME.json`` once; a resumed run skips what is already there.
  """

  def __init__(self, config, workdir, tokenizer, sampler, agent_cfg, writer, make_tasks: Callable[[], list[Task]]):
    self.config, self.workdir, self.tokenizer, self.sampler, self.writer = config, workdir, tokenizer, sampler, writer
    self.agent_cfg, self.make_tasks = agent_cfg, make_tasks
    ev = config.get("eval")
    self.n = ev.num_questions if ev else 0
    self.dir = epath.Path(workdir) / "eval"
    self.trajectories: list[Trajectory] = []

  def run(self, name: str, step: int) -> dict | None:
    if not self.n:
      return None
    path = self.dir / f"{name}.json"
    if path.exists():
      return json.loads(path.read_text())
    chief = jax.process_index() == 0
    if chief:
      print(f"held-out evaluation of the {name} checkpoint (step {step}) on {self.n} questions", flush=True)
    tasks = self.make_tasks()[: self.n]
    result = {}
    for mode, tool in (("tool", True), ("no_tool", False)):
      summary, trajs = evaluate_tasks(
        self.sampler,
        self.tokenizer,
        tasks,
        agent_config=self.agent_cfg,
        tool=tool,
        batch_size=self.config.eval.batch_size,
        log=print if chief else None,
      )
      result[mode] = {"step": step, **summary}
      if tool and name == "final":
        self.trajectories = trajs
      if chief:
        print(
          f"  {name} / {mode}: accuracy {summary['accuracy']:.3f}, tool calls/traj "
          f"{summary['tool_calls_per_traj']:.2f}, mean IoU {summary['mean_iou']:.3f}",
          flush=True,
        )
    self.writer.write_scalars(step, {f"eval/{k}": v for k, v in result["tool"].items() if k != "step"})
    self.writer.write_scalars(step, {f"eval_no_tool/{k}": v for k, v in result["no_tool"].items() if k != "step"})
    if chief:
      self.dir.mkdir(parents=True, exist_ok=True)
      tmp = epath.Path(f"{path}.tmp")
      tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
      # Local: os.replace, atomic. gs://: the best epath offers, a rename that is a server-side copy then a delete
      # (the copy makes the new object appear whole; a kill before the delete leaves the .tmp behind).
      tmp.replace(path)
      if name == "final":
        save_trajectories(self.trajectories, self.dir / "final_trajectories")
    return result

  def write_final(self) -> dict:
    """Writes and returns ``final_eval.json``: the warm-start and final checkpoints, with and without the tool."""
    checkpoints = {}
    for name in ("warmstart", "final"):
      path = self.dir / f"{name}.json"
      if path.exists():
        checkpoints[name] = json.loads(path.read_text())
    out = {"eval_data": self.config.eval.data, "num_questions": self.n, "seed": self.config.seed}
    out["checkpoints"] = checkpoints
    if "warmstart" in checkpoints and "final" in checkpoints:
      gain = checkpoints["final"]["tool"]["accuracy"] - checkpoints["warmstart"]["tool"]["accuracy"]
      out["rl_gain_points"] = round(100 * gain, 2)
    (epath.Path(self.workdir) / "final_eval.json").write_text(json.dumps(out, indent=2, sort_keys=True))
    print("final_eval.json: " + json.dumps(checkpoints_table(checkpoints)), flush=True)
    return out


def checkpoints_table(checkpoints: dict) -> dict:
  return {f"{c}/{m}": round(v["accuracy"], 3) for c, modes in checkpoints.items() for m, v in modes.items()}
