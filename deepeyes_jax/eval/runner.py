"""Benchmark evaluation with the zoom agent: batched rollouts, scoring, resumable per-item results, tables.

``evaluate_benchmark(items, rollout_fn, out_dir, settings)`` runs every item ``settings.num_samples`` times (greedy by
default), in batches of ``settings.batch_size`` items, through ``rollout_fn(tasks, group_size, seed)`` (the
sampler-backed ``run_rollouts`` in production, sharded over the mesh like training rollouts). After each batch it
appends one JSON line per item to ``out_dir/results.jsonl`` (flushed and fsynced) and that batch's trajectories to
``out_dir/trajectories.jsonl`` (+ ``images/``). On start it reads ``results.jsonl`` back and skips the items
already there, so a killed evaluation re-run with the same command continues where it stopped; a torn last line
and trajectories of unfinished items are dropped first. ``run_config.json`` pins the settings that change the
numbers (benchmark, seed, shuffle, samples, no-tool, checkpoint): resuming with different ones is refused.

At the end: ``summary.json`` and ``summary.md`` (accuracy by category: greedy / avg@k / pass@k, tool use, turns,
items skipped (at load and at task building); for POPE, precision / recall / F1 / yes-ratio; then a comparison
against the published numbers of docs/reference.md, "Published results"). Accuracies are fractions in summary.json
(``eval.loop.SUMMARY_KEYS``) and percent in summary.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from etils import epath

from deepeyes_jax.agent.trajectory import Trajectory, save_trajectories
from deepeyes_jax.data.benchmarks import BenchmarkItem, LoadReport
from deepeyes_jax.eval import loop, scoring
from deepeyes_jax.eval import tasks as tasks_lib
from deepeyes_jax.eval.loop import RolloutFn
from deepeyes_jax.reward import rewards

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
TRAJECTORIES = "trajectories.jsonl"

# docs/reference.md, "Published results" (accuracy %). V*: measured with the correct option always "A".
PUBLISHED: dict[str, dict[str, float]] = {
  "GPT-4o": {"vstar": 66.0, "hrbench_4k": 59.0, "hrbench_8k": 55.5},
  "Qwen2.5-VL-7B": {"vstar": 71.2, "hrbench_4k": 68.8, "hrbench_8k": 65.3},
  "Qwen2.5-VL-32B": {"vstar": 87.9, "hrbench_4k": 73.9, "hrbench_8k": 70.4},
  "ZoomEye-7B (training-free search)": {"vstar": 90.6, "hrbench_4k": 69.6, "hrbench_8k": 69.3},
  "DeepEyes-7B": {"vstar": 90.1, "hrbench_4k": 75.1, "hrbench_8k": 72.6},
}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  benchmark: str
  seed: int = 0
  shuffle_options: bool = True
  num_samples: int = 1  # k: avg@k and pass@k; 1 = greedy
  no_tool: bool = False
  batch_size: int = 8  # items per rollout batch (rows = batch_size * num_samples)
  checkpoint: str = ""
  save_trajectories: bool = True
  dtype: str = ""  # the model's compute dtype ("" = not recorded)
  # The rollout settings that change the numbers (turns, token budgets, pixels, sampling; not the engine's
  # performance knobs), as evaluate.py records them.
  rollout: dict[str, Any] = dataclasses.field(default_factory=dict)

  def pinned(self) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues."""
    keys = ("benchmark", "seed", "shuffle_options", "num_samples", "no_tool", "checkpoint", "dtype", "rollout")
    return {k: getattr(self, k) for k in keys}


# ----------------------------------------------------------------------------------------------------------------
# Resume


def read_done(out_dir: str | os.PathLike) -> dict[str, dict]:
  """Per-item results already written (item id -> record). Drops a torn last line (killed mid-write) from the file
  and the trajectories of items that have no result line."""
  path = epath.Path(out_dir) / RESULTS
  done: dict[str, dict] = {}
  if not path.exists():
    return done
  good, torn = [], 0
  with path.open() as f:
    for line in f:
      try:
        rec = json.loads(line)
        done[rec["item_id"]] = rec
        good.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        torn += 1
  if torn:
    log.warning("%s: dropping %d unreadable line(s) (a run killed mid-write)", path, torn)
    _rewrite(path, good)
  traj_path = epath.Path(out_dir) / TRAJECTORIES
  if traj_path.exists():
    with traj_path.open() as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if json.loads(line)["task_id"] in done:
          keep.append(line)
      except (ValueError, KeyError, TypeError):
        pass
    if len(keep) != len(lines):
      _rewrite(traj_path, keep)
  return done


def _rewrite(path: epath.Path, lines: list[str]) -> None:
  tmp = epath.Path(f"{path}.tmp")
  tmp.write_text("".join(lines))
  # Local: os.replace, atomic. gs://: the best epath offers, a rename that is a server-side copy then a delete; the
  # copy makes the new object appear whole (object writes are atomic), a kill before the delete leaves the .tmp
  # behind (overwritten by the next rewrite).
  tmp.replace(path)


def _check_settings(out_dir: str | os.PathLike, settings: EvalSettings) -> None:
  path = epath.Path(out_dir) / "run_config.json"
  pinned = settings.pinned()
  if path.exists():
    before = _flat(json.loads(path.read_text()))
    # A setting the earlier run did not record (an older run_config.json) is not compared.
    diff = {k: (before[k], v) for k, v in _flat(pinned).items() if k in before and before[k] != v}
    if diff:
      changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
      raise ValueError(f"{out_dir} holds an evaluation with other settings ({changes}); use another output directory")
  else:
    path.write_text(json.dumps(pinned, indent=2))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  """{"rollout": {"max_turns": 5}} -> {"rollout.max_turns": 5}: a changed setting is named by its config field."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# ----------------------------------------------------------------------------------------------------------------
# The loop: eval/loop.py's, with a benchmark's task builder and scorer, writing each batch as it finishes


def evaluate_benchmark(
  items: Sequence[BenchmarkItem],
  rollout_fn: RolloutFn,
  out_dir: str | os.PathLike,
  settings: EvalSettings,
  *,
  tokenizer=None,
  judge=None,
  load_report: LoadReport | None = None,
  write: bool = True,
) -> dict[str, Any]:
  """Evaluates ``items`` (resuming from ``out_dir``); returns the summary (also written to ``out_dir``).

  ``tokenizer`` decodes each response for DeepEyes-format items (scored by their reward function); ``write``:
  False on every process but the first of a multi-process run (all run the same batches; one writes). ``out_dir``:
  local or a URL epath handles (gs://bucket/eval/...)."""
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  if write:
    _check_settings(out_dir, settings)
  done = read_done(out_dir)
  todo = [it for it in items if it.item_id not in done]
  ids = [it.item_id for it in items]
  if len(set(ids)) != len(ids):
    raise ValueError("benchmark item ids are not unique")
  if done:
    print(f"resuming: {len(done)} of {len(items)} items already done, {len(todo)} to go", flush=True)
  shown = {
    it.item_id: scoring.show(it, seed=settings.seed, shuffle=settings.shuffle_options, no_tool=settings.no_tool)
    for it in todo
  }
  scorer = scoring.BenchmarkScorer(
    {it.item_id: it for it in todo}, shown, tokenizer=tokenizer, judge=judge, no_tool=settings.no_tool
  )

  def on_batch(batch, tasks, trajs, records):
    records = [_describe(item, shown[item.item_id], rec) for item, rec in zip(batch, records)]
    if write:
      _write_batch(out_dir, settings, trajs, records)
    for rec in records:
      done[rec["item_id"]] = rec

  loop.run(
    todo,
    lambda item: tasks_lib.benchmark_task(item, shown[item.item_id]),
    rollout_fn,
    scorer,
    item_id=lambda item: item.item_id,
    group_size=settings.num_samples,
    seed=settings.seed,
    batch_size=settings.batch_size,
    label=settings.benchmark,
    on_batch=on_batch,
    done_before=len(done),
  )
  summary = summarize([done[i] for i in ids if i in done], settings, load_report)
  if write:
    (epath.Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    (epath.Path(out_dir) / "summary.md").write_text(summary_markdown(summary))
  return summary


def _describe(item: BenchmarkItem, shown: scoring.Shown, record: dict) -> dict:
  """A loop record with the item's benchmark fields, for results.jsonl."""
  if record["error"] is not None:
    src = item.metadata.get("image_path", item.item_id)
    record = {**record, "error": f"{src}: {record['error']}"}
  return {
    "item_id": item.item_id,
    "benchmark": item.benchmark,
    "category": item.category,
    "question": item.question,
    "options_shown": list(shown.options),
    "option_order": list(shown.order),
    "ground_truth": shown.ground_truth,
    "answer_text": item.answer,
    **record,
  }


def _write_batch(out_dir, settings: EvalSettings, trajs: list[Trajectory], records: list[dict]) -> None:
  if settings.save_trajectories and trajs:
    save_trajectories(trajs, out_dir, filename=TRAJECTORIES)
  with (epath.Path(out_dir) / RESULTS).open("a") as f:  # results last: a result line means "done"
    f.write("".join(json.dumps(rec) + "\n" for rec in records))
    f.flush()
    try:
      fd = f.fileno()
    except (AttributeError, OSError):  # gs://: no descriptor (TF's GFile has no fileno); close() uploads the file
      fd = None
    if fd is not None:
      os.fsync(fd)


# ----------------------------------------------------------------------------------------------------------------
# Tables


def summarize(records: list[dict], settings: EvalSettings, load_report: LoadReport | None = None) -> dict[str, Any]:
  """Accuracy (%) by category and overall (micro average over items), plus the comparison rows.

  ``skipped`` counts the items whose task could not be built and those skipped when loading (``load_report``): by
  category where the loader could read the item's category (``LoadReport.by_category``; a category whose items were
  all skipped is a row of its own), all of them overall. POPE adds ``yes_no``: precision, recall, F1 and yes-ratio
  by category and overall (``yes_no_metrics``). ``has_options``: whether any item showed options (POPE and open
  questions show none, and the tables then say nothing about option order)."""
  load_skips = dict(load_report.by_category) if load_report is not None else {}
  cats = sorted({r["category"] for r in records} | set(load_skips))
  by_cat = {c: loop.summarize([r for r in records if r["category"] == c]) for c in cats}
  for c, n in load_skips.items():
    by_cat[c]["skipped"] += n
  overall = loop.summarize(records)
  if load_report is not None:
    overall["skipped"] += load_report.skipped
  has_options = any(r.get("options_shown") for r in records)
  ours = 100.0 * overall["accuracy"]
  comparison = [
    {"model": name, "accuracy": nums[settings.benchmark], "source": "published (docs/reference.md)"}
    for name, nums in PUBLISHED.items()
    if settings.benchmark in nums
  ]
  label = (
    "this run"
    + (" (no tool)" if settings.no_tool else "")
    + ("" if settings.shuffle_options or not has_options else " (options unshuffled)")
  )
  comparison.append({"model": label, "accuracy": ours, "source": settings.checkpoint or "?"})
  out = {
    "benchmark": settings.benchmark,
    "settings": dataclasses.asdict(settings),
    "has_options": has_options,
    "overall": overall,
    "by_category": by_cat,
    "comparison": comparison,
  }
  if settings.benchmark == "pope":
    out["yes_no"] = {
      "overall": yes_no_metrics(records),
      "by_category": {c: yes_no_metrics([r for r in records if r["category"] == c]) for c in cats},
    }
  if load_report is not None:
    out["load_report"] = {
      "items": load_report.items,
      "skipped": load_report.skipped,
      "by_reason": dict(load_report.by_reason),
      "by_category": dict(load_report.by_category),
      "problems": load_report.problems[:50],
    }
  return out


def yes_no_prediction(answer: str | None) -> str | None:
  """``"yes"`` / ``"no"``: what an answer's leading word says, as the rule that scores POPE reads it
  (``scoring._yes_no``; an answer of ``MAX_ANSWER_CHARS`` or more is scored wrong there, so it says nothing here);
  None: no answer, or one that does not start with yes or no."""
  if answer is None or len(answer) >= rewards.MAX_ANSWER_CHARS:
    return None
  return scoring._yes_no(answer)


def yes_no_metrics(records: Sequence[dict]) -> dict[str, float | int]:
  """POPE's metrics over every sample of the scored ``records`` ("yes" is the positive class): ``precision`` =
  TP / (TP + FP), ``recall`` = TP / (TP + FN), ``f1``, ``yes_ratio`` = "yes" predictions / samples (fractions;
  0.0 when a denominator is 0), the counts, and ``not_yes_no``: samples with no answer or one that does not start
  with yes / no (``yes_no_prediction``), which count as "no" predictions."""
  tp = fp = tn = fn = other = 0
  for r in records:
    if r["error"] is not None:
      continue
    positive = str(r.get("ground_truth", "")).strip().lower() == "yes"
    for s in r["samples"]:
      said = yes_no_prediction(s["answer"])
      other += said is None
      if said == "yes":
        tp, fp = tp + positive, fp + (not positive)
      else:
        fn, tn = fn + positive, tn + (not positive)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  n = tp + fp + tn + fn
  return {
    "samples": n,
    "precision": precision,
    "recall": recall,
    "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    "yes_ratio": (tp + fp) / n if n else 0.0,
    "tp": tp,
    "fp": fp,
    "tn": tn,
    "fn": fn,
    "not_yes_no": other,
  }


def summary_markdown(summary: dict[str, Any]) -> str:
  """The tables of ``summary.json`` as markdown: by category, POPE's yes/no metrics, the published numbers."""
  s = summary["settings"]
  k = s["num_samples"]
  options = summary.get("has_options", True)  # a summary.json written before the field: as it was then
  head = (
    f"# {summary['benchmark']}: {s['checkpoint'] or '?'}\n\n"
    f"seed {s['seed']}, "
    + (f"options {'shuffled' if s['shuffle_options'] else 'in release order'}, " if options else "")
    + f"{'greedy' if k == 1 else f'{k} samples'}, {'no tool (one turn)' if s['no_tool'] else 'zoom tool'}\n\n"
  )
  percent = ("greedy", "accuracy", "pass_at_k")  # fractions in summary.json, percent in the table
  cols = ["items", *percent, "tool_calls_per_traj", "successful_crops_per_traj"]
  cols += ["turns_per_traj", "judged_fraction", "no_answer_fraction", "skipped"]
  names = {"greedy": "greedy %", "accuracy": f"avg@{k} %", "pass_at_k": f"pass@{k} %"}
  lines = ["| category | " + " | ".join(names.get(c, c) for c in cols) + " |"]
  lines.append("|---" * (len(cols) + 1) + "|")
  rows = list(summary["by_category"].items()) + [("**overall**", summary["overall"])]
  for name, row in rows:
    cells = [f"{100 * row[c]:.1f}" if c in percent else _fmt(row[c]) for c in cols]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  load = summary.get("load_report") or {}
  if load.get("skipped"):
    n, reasons = load["skipped"], ", ".join(f"{r} {c}" for r, c in sorted(load["by_reason"].items()))
    # A summary.json written before load skips had categories: all of them were in the overall row only.
    overall_only = n - sum(load.get("by_category", {}).values())
    note = f"{n} item{'s' * (n != 1)} skipped when loading ({reasons}), counted in `skipped`"
    if overall_only:
      note += f" ({overall_only} in the overall row only: the loader could not read their category)"
    lines += ["", note + "; summary.json's `load_report` lists them."]
  if "yes_no" in summary:
    lines += _yes_no_table(summary["yes_no"])
  comp = ["", "## Against the published numbers (accuracy %)", "", "| model | accuracy | source |", "|---|---|---|"]
  for r in summary["comparison"]:
    comp.append(f"| {r['model']} | {r['accuracy']:.1f} | {r['source']} |")
  if summary["benchmark"] == "vstar":
    comp.append("")
    comp.append(
      "The published V* numbers come from an evaluation whose correct option was always A; with shuffled options "
      "DeepEyes-7B scores about 85."
    )
  if len(summary["comparison"]) == 1:
    comp.append("")
    comp.append("docs/reference.md lists no published numbers for this benchmark.")
  return head + "\n".join(lines + comp) + "\n"


def _yes_no_table(yes_no: dict[str, Any]) -> list[str]:
  """POPE's precision / recall / F1 / yes-ratio table (percent), with a "not yes/no" column when any answer was
  neither."""
  rows = list(yes_no["by_category"].items()) + [("**overall**", yes_no["overall"])]
  other = any(row["not_yes_no"] for _, row in rows)
  out = [
    "",
    '## Yes/no metrics ("yes" is the positive class; over all samples)',
    "",
    "| category | samples | precision % | recall % | F1 % | yes-ratio % |" + (" not yes/no |" if other else ""),
    "|---" * (6 + other) + "|",
  ]
  for name, row in rows:
    cells = [str(row["samples"])] + [f"{100 * row[c]:.1f}" for c in ("precision", "recall", "f1", "yes_ratio")]
    cells += [str(row["not_yes_no"])] if other else []
    out.append(f"| {name} | " + " | ".join(cells) + " |")
  out += [
    "",
    "An answer's prediction is its leading yes or no (the rule that scores it); an unanswered sample or an answer "
    'that starts with neither counts as a "no" prediction' + (" (the not yes/no column)." if other else "."),
  ]
  return out


def _fmt(x) -> str:
  return str(x) if isinstance(x, int) else f"{x:.2f}"
