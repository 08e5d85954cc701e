"""Data pipeline: tokenizers, corpora -> Megatron-Core .bin/.idx, datasets with per-token domain
labels, the synthetic corpus, and the resumable rank-sharded loader. See docs/data.md.

Entry points: config.DataConfig, pipeline.build_datasets, loader.build_dataloader. Nothing is
imported here, so that reading a config does not pull in Megatron-Core.
"""
