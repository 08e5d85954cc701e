"""The base of moe_dist's tokenizers: what Megatron-Core's GPTDataset needs of one.

In megatron-core 0.16 `megatron.core.tokenizers.MegatronTokenizer` is only a factory (its
__init__ raises and `from_pretrained` reads a metadata.json); the class that GPTDatasetConfig
is typed against and whose abstract methods a tokenizer must provide is `MegatronTokenizerBase`
(tokenize, detokenize, vocab, vocab_size, apply_chat_template). Every tokenizer here subclasses
it; `eod` and `unique_identifiers` are what GPTDataset reads besides.
"""

from __future__ import annotations

from megatron.core.tokenizers import MegatronTokenizerBase


class PretrainingTokenizer(MegatronTokenizerBase):
    """MegatronTokenizerBase with its abstract chat template answered: pretraining has none."""

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} is a pretraining tokenizer and has no chat template")
