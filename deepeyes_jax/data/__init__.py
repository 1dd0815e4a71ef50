"""DeepEyes training data: lazy parquet/JSONL sources, record decoding and grain input pipelines."""
