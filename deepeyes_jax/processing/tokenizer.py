"""Loading a checkpoint's tokenizer (``processing/tiny_tokenizer.py`` builds the tiny one the tests use)."""

from __future__ import annotations

import transformers


def load_tokenizer(path: str):
  """A transformers tokenizer from a local directory (never the hub)."""
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
