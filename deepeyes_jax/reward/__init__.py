"""Rewards per data source and the LLM judge: what training, evaluation and data selection score with."""
