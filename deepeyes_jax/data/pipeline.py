"""grain input pipelines over DeepEyes data: shuffled, sharded per JAX process, checkpointable, bad rows skipped.

Pipeline (grain 0.2.18 dataset API)::

    MapDataset.source(DeepEyesSource(paths))
      .seed(seed).shuffle()                  # global index shuffle, a different permutation per epoch (shuffle=True)
      [process_index::process_count]         # this process's shard: disjoint, the union over processes = the epoch
      .repeat(num_epochs)                    # None = forever
      .map(decode)                           # record -> Example, or a Skipped marker for a bad record
      .to_iter_dataset(ReadOptions(...))     # reads + decodes ahead in threads
      [.mp_prefetch(worker_count)]           # optional: decode in worker processes
      .filter(count_and_drop)                # counts/logs Skipped markers (and unknown data sources) in THIS
                                             # process, drops them
      .batch(batch_size, batch_fn=list)      # a batch is a list[Example]

The shard is taken after the shuffle, so every epoch each process sees a different slice of a fresh global
permutation, and within one epoch the processes' examples are disjoint and cover the source. The order depends only on
``(seed, process_index, process_count)`` (and ``worker_count`` when workers are used), not on timing.

Bad records (``decode_example`` raising ``BadRecord``: undecodable image, an image size the processor refuses, no
image, missing field, wrong types, image count) never stop the pipeline: they become ``Skipped`` markers that the
filter counts in ``DataStats`` and logs with ``logging.warning`` naming the file, the global index and the problem.
With ``known_sources`` (the caller's predicate or set of data sources a reward exists for, e.g.
``run_setup.known_data_source``) the filter also skips rows of any other ``data_source`` (``unknown_data_source``):
the check runs in the filter, in the calling process, so the predicate sees the reward plugins the caller imported
and need not be picklable. Filtering happens after the multiprocess prefetch, so the counters live in the calling
process even with ``worker_count > 0``. ``DataStats`` is per process and NOT part of the iterator's checkpoint state
(a restored iterator starts with whatever counters the caller's stats object holds, normally zero); aggregate it
across processes yourself if needed. ``DataStats.metrics()`` gives the counters as metrics (``data/skipped_<reason>``).
A file that cannot be read at all stops the pipeline with ``DataFileError`` naming it, and so do
``MAX_LEADING_BAD_RECORDS`` bad records before the first good one (the data is unusable, not noisy).

Checkpointing: the returned iterator is grain's own ``grain.DatasetIterator``. ``get_state()`` returns a small
JSON-serializable dict (the next index of the index-based part and the filter/batch position) and ``set_state(state)``
on a freshly built iterator with the same arguments resumes exactly after the last batch returned. Orbax can save it
directly: ``ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))`` /
``grain.checkpoint.CheckpointRestore(it)`` (one ``process_{i}-of-{n}.json`` file per JAX process, named by
``jax.process_index()``; the restore calls ``set_state`` on the iterator passed in). grain's iterators also implement
Orbax v1's ``StatefulCheckpointable`` (``save``/``load`` coroutines), but orbax-checkpoint 0.12.8 has no
``orbax.checkpoint.v1``. With ``worker_count > 0`` the state holds every worker's position and must be restored with
the same ``worker_count``; close such an iterator (``iterator.close()``) when done to stop its worker processes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import grain

from deepeyes_jax.data.deepeyes import (
  FILE_KEY,
  INDEX_KEY,
  REASONS,
  BadRecord,
  DeepEyesSource,
  Example,
  check_data_source,
  decode_example,
)
from deepeyes_jax.processing.image import MAX_DECODED_PIXELS

logger = logging.getLogger(__name__)

UNEXPECTED_ERROR = "unexpected_error"

Paths = str | os.PathLike | Sequence[str | os.PathLike] | DeepEyesSource
KnownSources = Callable[[str], bool] | Collection[str]


@dataclasses.dataclass
class DataStats:
  """Counters of one pipeline in this process (not checkpointed, not aggregated over processes).

  ``examples``: examples that passed the filter; ``skipped``: bad records dropped; ``by_reason``: ``skipped`` split by
  ``BadRecord.reason`` (``deepeyes.REASONS``: ``missing_field``, ``wrong_type``, ``bad_image``, ``image_size``,
  ``image_count_mismatch``, ``no_image``, ``unknown_data_source``, ``unreadable_record``; or ``unexpected_error`` for
  any other exception while decoding); ``by_source``: ``skipped`` split by file.
  """

  examples: int = 0
  skipped: int = 0
  by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  by_source: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def metrics(self, prefix: str = "data/") -> dict[str, float]:
    """The skip counters as metrics, cumulative since this process started (not checkpointed):
    ``data/skipped_records`` and ``data/skipped_<reason>`` for every known reason (0 until one happens, so each
    curve starts at the first step) and any other reason seen."""
    out = {f"{prefix}skipped_records": float(self.skipped)}
    for reason in (*REASONS, UNEXPECTED_ERROR, *sorted(self.by_reason)):
      out[f"{prefix}skipped_{reason}"] = float(self.by_reason.get(reason, 0))
    return out


@dataclasses.dataclass(frozen=True)
class Skipped:
  """What the decode step emits instead of an Example for a bad record (dropped by the filter)."""

  index: int | None
  source: str
  reason: str
  message: str


class IteratorAndStats(NamedTuple):
  iterator: grain.DatasetIterator  # yields list[Example]; get_state() / set_state(state)
  stats: DataStats


class DecodeOrSkip(grain.transforms.Map):
  """record -> Example, or Skipped for a bad record. Picklable (runs in worker processes with ``worker_count``)."""

  def __init__(self, max_decoded_pixels: int = MAX_DECODED_PIXELS):
    self.max_decoded_pixels = max_decoded_pixels

  def map(self, record: Mapping[str, Any]) -> Example | Skipped:
    index = record.get(INDEX_KEY) if isinstance(record, Mapping) else None
    source = str(record.get(FILE_KEY, "<record>")) if isinstance(record, Mapping) else "<record>"
    try:
      return decode_example(record, index, source_name=source, max_decoded_pixels=self.max_decoded_pixels)
    except BadRecord as e:
      return Skipped(index, source, e.reason, str(e))
    except Exception as e:  # never let one record kill a long run; counted and logged like a bad record
      return Skipped(index, source, UNEXPECTED_ERROR, f"{source} (index {index}): {type(e).__name__}: {e}")


MAX_LEADING_BAD_RECORDS = 100


def _predicate(known_sources: KnownSources | None) -> Callable[[str], bool] | None:
  if known_sources is None or callable(known_sources):
    return known_sources
  return frozenset(known_sources).__contains__


class CountAndDrop(grain.transforms.Filter):
  """Keeps Examples; counts and logs Skipped markers into ``stats``, and skips (the same way) Examples whose
  ``data_source`` ``known_sources`` rejects. Runs in the calling process."""

  def __init__(self, stats: DataStats, known_sources: KnownSources | None = None):
    self.stats = stats
    self.known_source = _predicate(known_sources)

  def filter(self, element: Example | Skipped) -> bool:
    if isinstance(element, Example) and self.known_source is not None:
      try:
        check_data_source(element, self.known_source)
      except BadRecord as e:
        element = Skipped(e.index, str(e.source), e.reason, str(e))
    if isinstance(element, Skipped):
      self.stats.skipped += 1
      self.stats.by_reason[element.reason] += 1
      self.stats.by_source[element.source] += 1
      logger.warning("skipping bad DeepEyes record [%s]: %s", element.reason, element.message)
      if self.stats.examples == 0 and self.stats.skipped >= MAX_LEADING_BAD_RECORDS:
        # Every record so far was bad: the data is unusable (wrong format, wrong paths), not noisy. Stop instead of
        # skipping forever, naming the files.
        files = ", ".join(f"{f} ({n})" for f, n in self.stats.by_source.most_common())
        raise ValueError(
          f"the first {self.stats.skipped} records were all bad ({dict(self.stats.by_reason)}) in {files}; "
          f"last: {element.message}"
        )
      return False
    self.stats.examples += 1
    return True


def _mark_absl_flags_parsed() -> None:
  """grain 0.2.18's multiprocess prefetch reads an absl flag (--grain_enable_multiprocess_worker_profiling) when a
  profiler framework such as JAX is loaded, and fails with UnparsedFlagAccessError in programs that never parse absl
  flags. Marking the flags parsed (all at their defaults) is what absl's own tests do; a later ``app.run`` still
  parses argv normally."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(
  paths: Paths,
  *,
  seed: int,
  batch_size: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  worker_count: int = 0,
  drop_remainder: bool = True,
  max_decoded_pixels: int = MAX_DECODED_PIXELS,
  read_threads: int = 8,
  prefetch_buffer_size: int | None = None,
  cache_row_groups: int = 4,
  known_sources: KnownSources | None = None,
) -> IteratorAndStats:
  """Training batches (``list[Example]`` of ``batch_size``) for this JAX process; see the module docstring.

  ``paths``: files, glob patterns or directories (``deepeyes.expand_paths``), or a ready ``DeepEyesSource``.
  ``process_index``/``process_count``: normally ``jax.process_index()``/``jax.process_count()``; ``batch_size`` is
  per process. ``num_epochs=None`` repeats forever. ``drop_remainder`` drops a final partial batch (only happens with
  a finite ``num_epochs``). ``worker_count > 0`` decodes in that many worker processes (``mp_prefetch``);
  ``read_threads`` and ``prefetch_buffer_size`` (elements, default ``max(batch_size, 2 * read_threads)``) bound the
  threaded read-ahead, i.e. how many decoded images are held in memory ahead of the consumer. ``known_sources``: a
  predicate or a set of the data sources a reward exists for (``run_setup.known_data_source``); rows of any other
  source are skipped and counted as ``unknown_data_source`` (None: no check).
  Returns ``(iterator, stats)``: a checkpointable ``grain.DatasetIterator`` and this process's ``DataStats``.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if worker_count < 0 or read_threads < 1:
    raise ValueError(f"need worker_count >= 0 and read_threads >= 1, got {worker_count} and {read_threads}")
  if isinstance(paths, str | os.PathLike | list | tuple):
    source = DeepEyesSource(paths, cache_row_groups=cache_row_groups)
  else:  # a ready random-access source of raw records: a DeepEyesSource, data.synthetic.SyntheticSource, ...
    source = paths
  if len(source) == 0:
    raise ValueError(f"{source!r} holds no records")

  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"process {process_index} of {process_count} gets no records from {source!r}")
  if num_epochs is None or num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(DecodeOrSkip(max_decoded_pixels))
  buffer = prefetch_buffer_size if prefetch_buffer_size is not None else max(batch_size, 2 * read_threads)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer))
  if worker_count > 0:
    _mark_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  stats = DataStats()
  it_ds = it_ds.filter(CountAndDrop(stats, known_sources))
  it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
  return IteratorAndStats(iter(it_ds), stats)
