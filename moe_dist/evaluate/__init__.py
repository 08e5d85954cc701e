"""Evaluation of a trained model outside the training loop: loss and perplexity per domain on any
data, with the eval's routing statistics (tools/evaluate.py), and the loading of a model from a
training or consolidated checkpoint that tools/evaluate.py and tools/generate.py share.

Modules: `loading` (a checkpoint -> an eval-mode `MoETransformer` at any EP size, with the eval
capacity made explicit), `sources` (text, `.jsonl` with labels and Megatron prefixes -> token
windows with per-token domain ids), `runner` (the loss and statistics over those windows, in one
process or under the launcher, reduced over every rank), `precision` (the standard error that a
token count gives, used by the trainer's validation too).

Sits between `checkpoint` and `train` in the import order (docs/design.md).
"""
