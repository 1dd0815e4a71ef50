"""The attention benchmark's quick run: the paged decode shape (the contiguous decode's rows with the cache in pages
of random order) runs through the gather path and the in-place Pallas kernel (interpret mode here), which agree."""

import json

import pytest

from deepeyes_jax.perf import attention as bench


def test_quick_decode_shapes_contiguous_and_paged(tmp_path, capsys):
  out = tmp_path / "attention.json"
  args = ["--quick", "--shapes", "decode,paged_decode", "--impls", "xla,pallas", "--reps", "1", "--dtype", "float32"]
  assert bench.main(args + ["--out", str(out)]) == 0
  rows = {(r["shape"], r["impl"]): r for r in json.loads(out.read_text())["results"]}
  assert set(rows) == {(s, i) for s in ("decode", "paged_decode") for i in ("xla", "pallas")}
  assert all("error" not in r and r["time_ms"] > 0 for r in rows.values())
  assert rows["paged_decode", "pallas"]["err_vs_xla"] <= 1e-5
  # The same rows, queries and keys: the paged layout changes where the cache lives, not what is attended.
  assert rows["paged_decode", "xla"]["visible_pairs"] == rows["decode", "xla"]["visible_pairs"]
  assert rows["paged_decode", "xla"]["bytes"] == pytest.approx(rows["decode", "xla"]["bytes"])
  assert "paged_decode" in capsys.readouterr().out
