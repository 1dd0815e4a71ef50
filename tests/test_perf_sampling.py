"""The sampling benchmark script end to end on its quick config: both sides run, interleaved rounds are recorded,
and our greedy tokens equal HF's (the benchmark's own parity check, fp32)."""

import json

from deepeyes_jax.perf import sampling as bench


def test_quick_run_writes_interleaved_rounds_and_matches_hf_tokens(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--quick", "--hf_attn", "eager", "--out", str(out)])
  result = json.loads(out.read_text())
  assert [r["batch"] for r in result["results"]] == [1, 2] and result["reps"] == 2
  for r in result["results"]:
    o, h = r["ours"], r["hf"]
    assert len(o["decode_runs_s"]) == len(h["generate_runs_s"]) == len(h["prefill_runs_s"]) == 2
    # Each round's ratio is that round's HF decode (generate - prefill, floored at 1 ns: on the quick run's few tokens
    # timing noise can make a round's generate shorter than its prefill) over ours.
    hf_decode = [max(g - p, 1e-9) for g, p in zip(h["generate_runs_s"], h["prefill_runs_s"])]
    expected = [hd / d for hd, d in zip(hf_decode, o["decode_runs_s"])]
    assert [round(x, 9) for x in r["decode_ratio_rounds"]] == [round(x, 9) for x in expected]
    assert r["decode_ratio"] == o["decode_tok_s"] / h["decode_tok_s"] > 0
    assert r["token_check"]["rows_identical"] == r["token_check"]["rows"] == r["batch"]
  printed = capsys.readouterr().out
  assert "batch 2: decode ratio of each interleaved round:" in printed
  assert "interleaved" in result["method"]
