"""`export-hf`: a training or consolidated checkpoint -> a directory transformers loads.

Mixtral when it can express the model exactly (`hf_mixtral.py`, no custom code), otherwise the
self-contained custom architecture (`hf_custom.py`, `trust_remote_code=True`); tokenizer files
when the checkpoint was trained with a SentencePiece model (`hf_tokenizer.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from moe_dist.checkpoint.consolidated import (
    ConsolidatedCheckpoint,
    full_state_dict,
    open_checkpoint,
)
from moe_dist.checkpoint.files import (
    SAFETENSORS,
    CheckpointError,
    cast_floating,
    check_option,
    check_output,
    staged_directory,
    torch_dtype,
    write_json,
    write_weights,
)
from moe_dist.checkpoint.hf_custom import (
    copy_modeling_files,
    custom_config,
    custom_state,
)
from moe_dist.checkpoint.hf_mixtral import (
    mixtral_blockers,
    mixtral_config,
    mixtral_state,
)
from moe_dist.checkpoint.hf_tokenizer import (
    sentencepiece_model,
    special_token_ids,
    write_tokenizer,
)

ARCHITECTURES = ("auto", "mixtral", "custom")


@dataclass
class ExportResult:
    out: str
    architecture: str  # "mixtral" or "custom"
    reasons: list[str] = field(default_factory=list)  # why not Mixtral (custom exports)
    tokenizer: bool = False  # tokenizer files written


def export_hf(ckpt_path: str, out: str, *, tag: str | None = None, architecture: str = "auto",
              master_weights: bool = False, dtype: str | None = None, tokenizer_model: str | None = None,
              overwrite: bool = False, progress: bool = True) -> ExportResult:
    check_option("architecture", architecture, ARCHITECTURES)
    cast = torch_dtype(dtype)
    check_output(out, overwrite)
    ckpt = open_checkpoint(ckpt_path, tag)
    cfg = ckpt.model_cfg
    recorded = ckpt.meta.get("tokenizer") if isinstance(ckpt, ConsolidatedCheckpoint) else ckpt.client.get("tokenizer")
    sp_model = sentencepiece_model((ckpt.config.get("data") or {}).get("tokenizer") or {"kind": "byte"}, recorded,
                                   tokenizer_model)
    state = cast_floating(full_state_dict(ckpt, master_weights, progress), cast)
    reasons = mixtral_blockers(cfg, state)
    if architecture == "mixtral" and reasons:
        raise CheckpointError(f"Mixtral cannot express the model of {ckpt_path!r}: {'; '.join(reasons)}; "
                              f"export with --architecture custom (or auto)")
    use_mixtral = architecture == "mixtral" or (architecture == "auto" and not reasons)
    token_ids = special_token_ids(sp_model)
    weight_dtype = state["embed.weight"].dtype
    with staged_directory(out, overwrite) as tmp:
        if use_mixtral:
            config, weights = mixtral_config(cfg, token_ids, weight_dtype), mixtral_state(cfg, state)
        else:
            config, weights = custom_config(cfg, token_ids, weight_dtype), custom_state(state)
            copy_modeling_files(tmp)
        write_json(os.path.join(tmp, "config.json"), config)
        write_weights(os.path.join(tmp, "model.safetensors"), weights, SAFETENSORS, metadata={"format": "pt"})
        write_tokenizer(sp_model, tmp, cfg.max_seq_len)
    return ExportResult(out=out, architecture="mixtral" if use_mixtral else "custom",
                        reasons=[] if use_mixtral else reasons, tokenizer=sp_model is not None)
