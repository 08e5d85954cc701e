"""Command-line tools. The user tools (evaluate, generate, convert_checkpoint, estimate_memory,
preprocess_data, train_tokenizer, routing_study) are scripts: `python tools/<name>.py`. The
benchmarks are the package `tools.bench`, run from the repository root as modules:
`python -m tools.bench.<name>`."""
