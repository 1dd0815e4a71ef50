"""The rollout benchmark script end to end on its quick config: both engines run in interleaved rounds, their
trajectories are identical (the script's own check), and the JSON holds the per-engine results and the ratios."""

import json

import pytest

from deepeyes_jax.perf import rollout as bench

ENGINE_KEYS = (
  "wall_s",
  "wall_runs_s",
  "trajectories_per_s",
  "generated_tokens_per_s",
  "slot_utilisation",
  "kv_bytes",
  "kv_peak_used_bytes",
  "prefill_tokens",
  "extend_tokens",
  "token_steps",
  "slot_steps",
  "segments",
  "warmup_s",
  "compile_s",
  "recompiled",
  "stop_reasons",
)


@pytest.mark.slow  # 50 s on the quiet 2-core machine, 71 s on a busy one (mostly the new engine's 18 compilations)
def test_quick_run_compares_both_engines_on_identical_trajectories(tmp_path, capsys):
  out = tmp_path / "rollout.json"
  bench.main(["--quick", "--rounds", "1", "--out", str(out)])
  result = json.loads(out.read_text())
  for key in ("trajectories_per_s_ratio", "peak_kv_bytes_ratio", "prefill_tokens_ratio", "workload", "machine"):
    assert key in result
  assert {"platform", "cpu_count", "jax"} <= set(result["machine"]) and result["date"]
  w = result["workload"]
  assert (w["tasks"], w["group"], w["rows"], w["rounds"]) == (4, 4, 16, 1)
  old, new = result["old"], result["new"]
  for engine in (old, new):
    assert set(ENGINE_KEYS) <= set(engine)
    assert len(engine["wall_runs_s"]) == 1 and engine["trajectories"] == 16 and engine["recompiled"] == 0
  # The script asserts the two engines' trajectories are the same; what it records of that check:
  assert result["check"] == dict(identical=True, rows=16, max_logprob_diff=result["check"]["max_logprob_diff"])
  assert result["check"]["max_logprob_diff"] <= 1e-5
  assert old["token_steps"] == new["token_steps"] and old["stop_reasons"] == new["stop_reasons"]
  assert old["extend_tokens"] == new["extend_tokens"]
  # One prompt prefill per group of G = 4 instead of one per row; the old engine's KV is rows x max_total_tokens.
  assert result["prefill_tokens_ratio"] == 4.0
  assert result["peak_kv_bytes_ratio"] == old["kv_bytes"] / new["kv_bytes"] > 1
  assert result["trajectories_per_s_ratio"] == result["trajectories_per_s_ratio_rounds"][0] > 0
  printed = capsys.readouterr().out
  assert "trajectories are identical" in printed and "| trajectories/s |" in printed
