"""The KV-cache sampler: HF generate parity, decode == full forward, extend-after-decode, sampling rules, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from conftest import IMAGE, image_block, random_pixels, rel_err

from deepeyes_jax import sampling as smp
from deepeyes_jax.models import qwen2_5_vl as qvl
from deepeyes_jax.parallel import sharding as shd

ROWS = [
  ([5, 6] + image_block((1, 8, 8)) + [7], [(1, 8, 8)]),
  ([8] + image_block((1, 4, 6)) + [9, 10, 11, 12], [(1, 4, 6)]),
  ([13, 14, 15] + image_block((1, 6, 4)) + [16, 17, 18, 19, 20, 21], [(1, 6, 4)]),
]


def _chunks(rows, seed=3):
  grids = [g for _, gs in rows for g in gs]
  pv = random_pixels(grids, seed=seed)
  out, off = [], 0
  for ids, gs in rows:
    imgs = []
    for g in gs:
      n = int(np.prod(g))
      imgs.append((pv[off : off + n], np.array(g)))
      off += n
    out.append(smp.Chunk(ids, imgs))
  return out


def _full_logits(model, sequences):
  """Logits of a from-scratch forward over whole sequences (one row at a time, no cache)."""
  outs = []
  for ids, images in sequences:
    kw = {}
    if images:
      kw = dict(pixel_values=np.concatenate([p for p, _ in images]), image_grid_thw=np.stack([g for _, g in images]))
    outs.append(np.asarray(model(np.array([ids]), **kw))[0])
  return outs


def test_greedy_matches_hf_generate_token_for_token(hf_checkpoint, jax_model):
  hf = hf_checkpoint[1]
  chunks = _chunks(ROWS)
  s = max(len(r) for r, _ in ROWS)
  ids = np.zeros((3, s), np.int64)
  mask = np.zeros((3, s), np.int64)
  for i, (r, _) in enumerate(ROWS):
    ids[i, s - len(r) :], mask[i, s - len(r) :] = r, 1  # HF wants left padding; our cache has none
  grids = [g for _, gs in ROWS for g in gs]
  pv = np.concatenate([p for c in chunks for p, _ in c.images])
  hf.generation_config.eos_token_id = None
  with torch.no_grad():
    ref = hf.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      pixel_values=torch.tensor(pv),
      image_grid_thw=torch.tensor(grids),
      mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
      max_new_tokens=32,
      do_sample=False,
      pad_token_id=0,
      suppress_tokens=[IMAGE, IMAGE + 1],  # our default: never sample the image/video placeholders
    )[:, s:].numpy()
  sampler = smp.Sampler(jax_model)
  cache, logits = sampler.extend(sampler.init_cache(3, 256), chunks)
  cache, out = sampler.decode(cache, logits, max_new_tokens=32)
  np.testing.assert_array_equal(np.array(out.tokens), ref)
  assert out.stop_reason == ["length"] * 3
  np.testing.assert_array_equal(np.asarray(cache.lengths), [len(r) + 32 for r, _ in ROWS])


def test_decode_logits_equal_full_forward(jax_model):
  sampler = smp.Sampler(jax_model)
  chunks = _chunks(ROWS)
  cache, logits = sampler.extend(sampler.init_cache(3, 256), chunks)
  cache, out = sampler.decode(cache, logits, max_new_tokens=12, return_logits=True)
  seqs = [(list(c.tokens) + out.tokens[r], list(c.images)) for r, c in enumerate(chunks)]
  for r, full in enumerate(_full_logits(jax_model, seqs)):
    p = len(chunks[r].tokens)
    ref = full[p - 1 : p - 1 + 12]  # position i predicts token i + 1
    assert rel_err(out.logits[r, :12], ref) <= 1e-5
    # The reported log-probs are log-softmax of those logits at the chosen tokens.
    lp = jax.nn.log_softmax(jnp.asarray(ref), -1)[np.arange(12), np.array(out.tokens[r])]
    np.testing.assert_allclose(out.logprobs[r], np.asarray(lp), rtol=1e-5, atol=1e-5)


def test_extend_after_decode_equals_reprefill(jax_model):
  sampler = smp.Sampler(jax_model)
  chunks = _chunks(ROWS)
  cache, logits = sampler.extend(sampler.init_cache(3, 384), chunks)
  cache, first = sampler.decode(cache, logits, max_new_tokens=[6, 9, 4])
  # Append an observation with a new image to rows 0 and 2 (row 1 stays as it is), then decode again.
  extra = _chunks(
    [([30, 31] + image_block((1, 6, 8)) + [32], [(1, 6, 8)]), ([40] + image_block((1, 2, 4)), [(1, 2, 4)])], 9
  )
  cache, logits = sampler.extend(cache, [extra[0], None, extra[1]])
  cache, second = sampler.decode(cache, logits, max_new_tokens=[8, 0, 8], return_logits=True)
  assert second.stop_reason[1] == "inactive" and second.tokens[1] == []

  # From scratch: prefill the whole sequences and decode the same number of tokens.
  full_rows = [
    smp.Chunk(
      list(chunks[0].tokens) + first.tokens[0] + list(extra[0].tokens), list(chunks[0].images) + list(extra[0].images)
    ),
    smp.Chunk(
      list(chunks[2].tokens) + first.tokens[2] + list(extra[1].tokens), list(chunks[2].images) + list(extra[1].images)
    ),
  ]
  fresh = smp.Sampler(jax_model)
  c2, lg2 = fresh.extend(fresh.init_cache(2, 384), full_rows)
  c2, again = fresh.decode(c2, lg2, max_new_tokens=8, return_logits=True)
  for r, rr in ((0, 0), (2, 1)):
    assert second.tokens[r] == again.tokens[rr]
    assert rel_err(second.logits[r, :8], again.logits[rr, :8]) <= 1e-5
  # The cache's next positions continue exactly as get_rope_index over the whole sequence.
  ids0 = np.array([full_rows[0].tokens + second.tokens[0]])
  _, delta = qvl.get_rope_index(ids0, np.stack([g for _, g in full_rows[0].images]), image_token_id=IMAGE)
  assert int(cache.next_pos[0]) == ids0.shape[1] + int(delta[0])


def test_stop_tokens_budgets_and_full_cache(jax_model):
  sampler = smp.Sampler(jax_model)
  cache, logits = sampler.extend(sampler.init_cache(3, 256), _chunks(ROWS))
  _, free = sampler.decode(cache, logits, max_new_tokens=10)
  stop = free.tokens[0][3]
  first = free.tokens[0].index(stop)
  cache, logits = sampler.extend(sampler.init_cache(3, 256), _chunks(ROWS))
  _, out = sampler.decode(cache, logits, max_new_tokens=[10, 5, 0], stop_tokens=[stop])
  assert out.tokens[0] == free.tokens[0][: first + 1] and out.stop_reason[0] == "stop_token"
  assert len(out.tokens[1]) == 5 and out.stop_reason[1] in ("length", "stop_token")
  assert out.tokens[2] == [] and out.stop_reason[2] == "inactive"
  # A cache with room for 3 more tokens in row 0.
  cap = len(ROWS[0][0]) + 3
  cache, logits = sampler.extend(sampler.init_cache(3, cap), _chunks(ROWS))
  _, out = sampler.decode(cache, logits, max_new_tokens=50)
  assert out.stop_reason[0] == "cache_full" and len(out.tokens[0]) == cap - len(ROWS[0][0])


def _hand_filtered_probs(logits, temperature, top_k, top_p):
  """Independent numpy version of temperature -> top-k -> top-p filtering."""
  x = logits.astype(np.float64) / temperature
  keep = np.ones_like(x, bool)
  if top_k:
    keep &= x >= np.sort(x)[-top_k]
  p = np.exp(x - x.max()) * keep
  p /= p.sum()
  order = np.argsort(-p)
  mass_before = np.cumsum(p[order]) - p[order]
  nucleus = np.zeros_like(keep)
  nucleus[order[mass_before < top_p]] = True
  p = p * nucleus
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 6, 0.95), (1.0, 4, 1.0)])
def test_sampling_matches_filtered_softmax(temperature, top_k, top_p):
  logits = jax.random.normal(jax.random.key(1), (24,)) * 2.0
  params = smp.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
  expected = _hand_filtered_probs(np.asarray(logits), temperature, top_k, top_p)
  n = 40_000
  draws = jax.vmap(lambda k: smp.sample(k, logits, params))(jax.random.split(jax.random.key(7), n))
  counts = np.bincount(np.asarray(draws), minlength=24)
  assert counts[expected == 0].sum() == 0  # nothing outside top-k / the nucleus
  kept = expected > 0
  _, pvalue = scipy.stats.chisquare(counts[kept], expected[kept] * n)
  assert pvalue > 1e-3


def test_greedy_is_argmax_and_params_are_validated():
  logits = jnp.array([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
  np.testing.assert_array_equal(smp.sample(None, logits, smp.GREEDY), [1, 0])
  with pytest.raises(ValueError, match="top_p"):
    smp.SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    smp.SamplingParams(temperature=-1.0)


def test_row_output_does_not_depend_on_other_rows(jax_model):
  params = smp.SamplingParams(temperature=1.0)
  sampler = smp.Sampler(jax_model)

  def run(rows, row_ids):
    cache, logits = sampler.extend(sampler.init_cache(len(rows), 256), _chunks(rows))
    return sampler.decode(cache, logits, max_new_tokens=16, params=params, keys=smp.row_keys(5, row_ids))[1]

  a = run(ROWS, [0, 1, 2])
  b = run([ROWS[0], ROWS[2], ROWS[1]], [0, 2, 1])  # other rows swapped
  c = run([ROWS[0]], [0])  # alone
  assert a.tokens[0] == b.tokens[0] == c.tokens[0]
  assert a.tokens[2] == b.tokens[1] and a.tokens[1] == b.tokens[2]
  np.testing.assert_allclose(a.logprobs[0], c.logprobs[0], rtol=1e-5, atol=1e-5)
  d = run(ROWS, [3, 1, 2])  # a different key for row 0 changes row 0 only
  assert d.tokens[0] != a.tokens[0] and d.tokens[1:] == a.tokens[1:]


def test_sharded_sampling_equals_single_device(hf_checkpoint, jax_model):
  rows = ROWS + [([50, 51, 52, 53], [])]
  single = smp.Sampler(jax_model)
  cache, logits = single.extend(single.init_cache(4, 256), _chunks(rows))
  _, ref = single.decode(cache, logits, max_new_tokens=12)

  mesh = shd.make_mesh(2, 2, 2)
  sharded_model = qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32, mesh=mesh)
  sampler = smp.Sampler(sharded_model, mesh=mesh)
  cache = sampler.init_cache(4, 256)
  # (B, K, C, hd)
  want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", None, None))
  assert cache.k[0].sharding.is_equivalent_to(want, 4)
  cache, logits = sampler.extend(cache, _chunks(rows))
  cache, out = sampler.decode(cache, logits, max_new_tokens=12)
  assert cache.k[0].sharding.is_equivalent_to(want, 4)
  assert out.tokens == ref.tokens
  for a, b in zip(out.logprobs, ref.logprobs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bad_inputs_fail_before_compiling(jax_model):
  sampler = smp.Sampler(jax_model)
  cache = sampler.init_cache(2, 32)
  long = smp.Chunk(list(range(3, 40)))
  with pytest.raises(ValueError, match="row 1: 0 cached \\+ 37 new tokens exceed the cache capacity 32"):
    sampler.extend(cache, [smp.Chunk([5, 6]), long])
  with pytest.raises(ValueError, match="empty prompt"):
    sampler.extend(cache, [smp.Chunk([5, 6]), smp.Chunk([])])
  with pytest.raises(ValueError, match="every chunk is empty"):
    sampler.extend(cache, [None, None])
  bad = _chunks([([5] + image_block((1, 4, 6)) + [6], [(1, 4, 6)])])[0]
  bad.tokens = bad.tokens[:-3]  # drops [6], <|vision_end|> and one placeholder
  with pytest.raises(ValueError, match="row 0: 5 <\\|image_pad\\|> tokens but its 1 image\\(s\\) give 6"):
    sampler.extend(cache, [bad, smp.Chunk([5])])
  with pytest.raises(ValueError, match="keys"):
    sampler.decode(cache, jnp.zeros((2, 256)), max_new_tokens=4, params=smp.SamplingParams())
  assert sampler.num_compiles == 0


def test_compilations_are_bounded_by_buckets(jax_model):
  from deepeyes_jax.sampling import sampler as sampler_lib

  sampler = smp.Sampler(jax_model, min_token_bucket=16, min_patch_bucket=64)
  before = sampler_lib._extend._cache_size()
  rng = np.random.default_rng(0)
  for n_text in (3, 9, 14, 20, 27, 31, 40, 55, 60):
    g = (1, 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5)))
    rows = [([5] * n_text + image_block(g), [g]), ([6] * (n_text // 2 + 1), [])]
    cache, logits = sampler.extend(sampler.init_cache(2, 160), _chunks(rows, seed=n_text))
  # token buckets {16, 32, 64} x patch buckets {64} -> at most 3 extend compilations for 9 calls
  assert sampler.num_compiles <= 3
  assert sampler_lib._extend._cache_size() - before == sampler.num_compiles


def test_sampler_with_pallas_attention_matches_xla(hf_checkpoint, jax_model):
  """extend + decode through the Pallas kernels (interpret mode on CPU) give the XLA path's tokens and log-probs."""
  ref_sampler = smp.Sampler(jax_model)
  cache, logits = ref_sampler.extend(ref_sampler.init_cache(3, 128), _chunks(ROWS))
  _, ref = ref_sampler.decode(cache, logits, max_new_tokens=6)
  model = qvl.from_pretrained(hf_checkpoint[0], dtype=jnp.float32, attention_impl="pallas")
  sampler = smp.Sampler(model)
  cache, logits = sampler.extend(sampler.init_cache(3, 128), _chunks(ROWS))
  _, out = sampler.decode(cache, logits, max_new_tokens=6)
  assert out.tokens == ref.tokens
  for a, b in zip(out.logprobs, ref.logprobs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
