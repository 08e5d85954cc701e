"""`export-hf`: a training or consolidated checkpoint -> a directory transformers loads:
config.json, model.safetensors and, for a checkpoint trained with a SentencePiece model,
tokenizer files. A native transformers class (no custom code) when one computes the model
exactly: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM,
DeepseekV2ForCausalLM, DeepseekV3ForCausalLM or Glm4MoeForCausalLM, the first of these whose
`export_blockers` (arch.py) are empty with `--architecture auto`; otherwise the self-contained
custom architecture (`trust_remote_code=True`), which has standard whole-head rotary attention
only: a model with latent attention, partial rotary or YaRN that no native class expresses is
refused (`custom_blockers`).

Native exports: config.json from `arch.hf_config`, weights by running `tensors.tensor_plan`
backward, in the Hub's per-expert layout (transformers 5 fuses it on load; transformers 4, vLLM
and llama.cpp read it as is); docs/checkpoints.md has each architecture's table. What the
architectures compute and which moe_dist settings each expresses: arch.py. They never drop
tokens, so their logits equal moe_dist's when moe_dist's eval capacity drops nothing.

The custom architecture (`auto_map` in config.json) loads with
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` without moe_dist installed. Its
modeling file (`remote_code/modeling_moe_dist.py`, copied into OUT) mirrors `MoETransformer`
module for module (its attention and routers in files of their own beside it, copied along), so
the mapping is the identity plus a prefix: moe_dist's ep_size=1 tensor `<name>` is
`model.<name>` (router statistics buffers included), and config.json carries moe_dist's `model`
and `moe` sections as `moe_dist_model` / `moe_dist_moe`. It computes every model moe_dist builds
with standard attention (`model.attention: mha`, whole-head plain rotary).
The one addition to the state dict is COMET's expert-mask projections (`comet_mask_state`),
which moe_dist redraws from the checkpoint's model seed and the remote code cannot.

The tokenizer. A checkpoint trained with a SentencePiece model gets `tokenizer.model` (the same
file, checked against the digest the trainer recorded) and the fast `tokenizer.json` that
transformers' `LlamaTokenizer` converts it to (BPE or unigram, byte fallback, no BOS/EOS added).
It reproduces moe_dist's ids except at the very start of a text that begins with whitespace:
SentencePiece always adds its dummy-prefix piece there, while transformers skips the prefix when
the text already starts with a space (one piece fewer). Decoding is identical. The built-in byte
tokenizer is written as an equivalent fast tokenizer (`tokenizer.py`). A Hugging Face tokenizer
(`kind: hf`, e.g. after `import-hf`) has its files copied from its directory, with the special ids
of that directory's config.json. Every export has a pad token (the tokenizer's, else
end-of-document), pads on the left, and writes generation_config.json naming eos and pad.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moe_dist.checkpoint.consolidated import full_state_dict, model_seed, open_checkpoint
from moe_dist.checkpoint.files import (SAFETENSORS, CheckpointError, cast_floating, check_option, check_output,
                                       dtype_name, read_json, staged_directory, torch_dtype, write_json, write_weights)
from moe_dist.checkpoint.hf import remote_code
from moe_dist.checkpoint.hf.arch import ARCHS, MOE_ARCHS, export_blockers, hf_config
from moe_dist.checkpoint.hf.importer import replace_mtp_layers
from moe_dist.checkpoint.hf.tensors import HUB, tensor_plan
from moe_dist.checkpoint.hf.tokenizer import pad_token_ids, write_byte_tokenizer, write_generation_config
from moe_dist.common.config import to_dict
from moe_dist.model.config import ModelConfig
from moe_dist.moe.expert_mask import expert_mask_projections

ARCHITECTURES = ("auto", *MOE_ARCHS, "custom")
CONFIG_MODULE, MODELING_MODULE = "configuration_moe_dist", "modeling_moe_dist"
# moe_dist.data.tokenizers.ByteTokenizer.EOD; not imported: that package pulls in Megatron-Core.
BYTE_EOD = 256
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


# ---- native transformers classes ---------------------------------------------------------------

def _selection_bias_active(cfg: ModelConfig, state: dict[str, Tensor]) -> bool:
    return any(bool(state[f"blocks.{i}.moe.router.selection_bias_E"].any()) for i in cfg.moe_layer_indices
               if f"blocks.{i}.moe.router.selection_bias_E" in state)


def native_blockers(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, list[str]]:
    """Per native architecture, why it cannot express this model (empty list: it can)."""
    active = _selection_bias_active(cfg, state)
    return {name: export_blockers(ARCHS[name], cfg, active) for name in MOE_ARCHS}


def mixtral_blockers(cfg: ModelConfig, state: dict[str, Tensor]) -> list[str]:
    """Why Mixtral cannot express this model (empty: it can)."""
    return native_blockers(cfg, state)["mixtral"]


def native_state(arch_name: str, cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The HF tensors of `arch_name` (Hub layout) from moe_dist's ep_size=1 state dict."""
    plan = tensor_plan(ARCHS[arch_name], cfg, HUB)
    unmapped = sorted(set(state) - {m.target for m in plan})
    if unmapped:  # never drop a tensor silently
        raise CheckpointError(f"{ARCHS[arch_name].display} has no place for the tensors {unmapped}")
    out = {}
    for m in plan:
        for src, t in zip(m.sources, m.to_hf(state[m.target])):
            out[src.name] = t
    return out


# ---- the custom architecture -------------------------------------------------------------------

def comet_mask_state(cfg: ModelConfig, seed: int) -> dict[str, Tensor]:
    """COMET's expert-mask projections (`moe.comet_active_fraction`) under moe_dist's module names,
    all E experts' (`v_EDF`, the whole of what each rank's `v_eDF` buffer slices).

    moe_dist keeps them out of its state dict and redraws them from the model seed at build time;
    the remote code cannot (no moe_dist there), so the export carries them, for every expert (the
    draw is per global expert id, so this is what every EP rank computed). Always fp32, whatever
    `--dtype`: moe_dist draws the matrix in fp32 and scores the mask in fp32 (`mask_expert_hidden`);
    a bf16 copy would move the k-WTA winners of near-tied units, for a few MB per layer saved."""
    moe = cfg.moe
    if moe is None or moe.comet_active_fraction is None:
        return {}
    return {f"blocks.{i}.moe.experts.hidden_mask.v_EDF":
            expert_mask_projections(moe.num_experts, 0, moe.d_model, moe.d_ff, seed=seed, layer_index=i)
            for i in cfg.moe_layer_indices}


def custom_config(cfg: ModelConfig, token_ids: dict[str, int | None], dtype: torch.dtype) -> dict[str, Any]:
    model = to_dict(cfg)
    moe = model.pop("moe")
    return {
        "architectures": ["MoEDistForCausalLM"],
        "model_type": "moe_dist",
        "auto_map": {"AutoConfig": f"{CONFIG_MODULE}.MoEDistConfig",
                     "AutoModelForCausalLM": f"{MODELING_MODULE}.MoEDistForCausalLM"},
        "moe_dist_model": model,
        "moe_dist_moe": moe,
        "use_cache": True,  # the modeling file takes transformers' Cache
        "dtype": dtype_name(dtype),
        **token_ids,
    }


def custom_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"model.{name}": t for name, t in state.items()}


def copy_modeling_files(out_dir: str) -> None:
    """Every file of remote_code/ but its __init__: the modeling file imports the others
    relatively, and transformers' loader resolves those imports in the export's directory."""
    src = os.path.dirname(remote_code.__file__)
    for name in sorted(os.listdir(src)):
        if name.endswith(".py") and name != "__init__.py":
            shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))


# ---- the tokenizer -----------------------------------------------------------------------------

def sentencepiece_model(tokenizer: dict[str, Any], recorded: dict[str, Any] | None, override: str | None) -> str | None:
    """Path of the SentencePiece model to export (None for the byte tokenizer), verified against
    the sha256 the trainer recorded when it has one."""
    if tokenizer.get("kind") != "sentencepiece":
        return None
    path = override or tokenizer.get("model")
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"the checkpoint's tokenizer is the SentencePiece model {tokenizer.get('model')!r}, "
                              f"which does not exist here{f' (nor {override!r})' if override else ''}; pass "
                              f"--tokenizer-model PATH")
    digest = ((recorded or {}).get("unique_identifiers") or {}).get("sha256")
    if digest is not None:
        with open(path, "rb") as f:
            actual = hashlib.sha256(f.read()).hexdigest()
        if actual != digest:
            raise CheckpointError(f"SentencePiece model {path!r} has sha256 {actual}, but the checkpoint was "
                                  f"trained with one whose sha256 is {digest}")
    return path


def special_token_ids(sp_model: str | None) -> dict[str, int | None]:
    if sp_model is None:
        return {"bos_token_id": None, "eos_token_id": BYTE_EOD, "pad_token_id": None}
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    return {k: (v if v >= 0 else None) for k, v in
            (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()), ("pad_token_id", sp.pad_id()))}


def write_tokenizer(sp_model: str | None, out_dir: str, max_length: int, vocab_size: int) -> None:
    """tokenizer.json (+ tokenizer_config.json) as transformers' LlamaTokenizer converts the
    SentencePiece model, and the model itself as tokenizer.model. The fast tokenizer.json is what
    makes AutoTokenizer right whatever config.json's model_type maps to (for `mixtral` it picks
    the generic TokenizersBackend, which reads only tokenizer.json)."""
    if sp_model is None:
        if vocab_size > BYTE_EOD:  # else the model cannot read what the byte tokenizer emits
            write_byte_tokenizer(out_dir, max_length)
        return
    try:
        from transformers import LlamaTokenizer
    except ImportError:
        raise CheckpointError("exporting a SentencePiece tokenizer needs transformers: pip install "
                              "'moe_dist[hf]'") from None
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    with tempfile.TemporaryDirectory() as src:
        shutil.copyfile(sp_model, os.path.join(src, "tokenizer.model"))
        write_json(os.path.join(src, "tokenizer_config.json"), {
            "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "add_eos_token": False,
            "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
            "pad_token": piece(sp.pad_id()) or piece(sp.eos_id()), "padding_side": "left",
            "clean_up_tokenization_spaces": False})
        tokenizer = LlamaTokenizer.from_pretrained(src)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(sp_model, os.path.join(out_dir, "tokenizer.model"))


def hf_tokenizer_dir(tokenizer: dict[str, Any]) -> str | None:
    """The directory of a Hugging Face tokenizer (`kind: hf`), None for the other kinds."""
    if tokenizer.get("kind") != "hf":
        return None
    path = tokenizer.get("path")
    if not path or not os.path.isdir(path):
        raise CheckpointError(f"the checkpoint's tokenizer is the Hugging Face tokenizer directory {path!r}, "
                              f"which does not exist here")
    return path


def hf_token_ids(path: str) -> dict[str, int | None]:
    """bos/eos/pad ids of a Hugging Face tokenizer directory's model config (None where absent)."""
    config_path = os.path.join(path, "config.json")
    config = read_json(config_path, "Hugging Face model config") if os.path.isfile(config_path) else {}
    return {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def copy_hf_tokenizer(path: str | None, out_dir: str) -> bool:
    """Copy a Hugging Face tokenizer's files into the export; whether there were any."""
    names = [n for n in HF_TOKENIZER_FILES if path and os.path.isfile(os.path.join(path, n))]
    for name in names:
        shutil.copyfile(os.path.join(path, name), os.path.join(out_dir, name))
    return bool(names)


# ---- the export --------------------------------------------------------------------------------

@dataclass
class ExportResult:
    out: str
    architecture: str  # "mixtral", "qwen2_moe", "qwen3_moe", "olmoe" or "custom"
    reasons: list[str] = field(default_factory=list)  # why not Mixtral (custom exports)
    tokenizer: bool = False  # tokenizer files written
    # Custom exports: per native architecture, why it cannot express the model.
    blockers: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the export leaves out (multi-token prediction)


def _native_choice(architecture: str, blockers: dict[str, list[str]], ckpt_path: str) -> str | None:
    """The native architecture to write (None: the custom one)."""
    if architecture in MOE_ARCHS:
        if blockers[architecture]:
            raise CheckpointError(f"{ARCHS[architecture].display} cannot express the model of {ckpt_path!r}: "
                                  f"{'; '.join(blockers[architecture])}; export with --architecture custom (or auto)")
        return architecture
    if architecture == "auto":
        return next((name for name in MOE_ARCHS if not blockers[name]), None)
    return None


def custom_blockers(cfg: ModelConfig) -> list[str]:
    """What the remote code (remote_code/) does not compute: it has standard attention with
    whole-head plain rotary only."""
    reasons = []
    if cfg.attention != "mha":
        reasons.append(f"model.attention is {cfg.attention!r}")
    if cfg.partial_rotary_factor != 1.0:
        reasons.append(f"model.partial_rotary_factor is {cfg.partial_rotary_factor}")
    if cfg.rope_scaling is not None:
        reasons.append(f"model.rope_scaling is {cfg.rope_scaling.type!r}")
    return reasons


def export_hf(ckpt_path: str, out: str, *, tag: str | None = None, architecture: str = "auto",
              master_weights: bool = False, dtype: str | None = None, tokenizer_model: str | None = None,
              overwrite: bool = False, progress: bool = True) -> ExportResult:
    check_option("architecture", architecture, ARCHITECTURES)
    cast = torch_dtype(dtype)
    check_output(out, overwrite)
    ckpt = open_checkpoint(ckpt_path, tag)
    cfg = ckpt.model_cfg
    tokenizer = (ckpt.config.get("data") or {}).get("tokenizer") or {"kind": "byte"}
    sp_model = sentencepiece_model(tokenizer, ckpt.recorded_tokenizer, tokenizer_model)
    hf_tokenizer = hf_tokenizer_dir(tokenizer)
    state = cast_floating(full_state_dict(ckpt, master_weights, progress), cast)
    notes = []
    if cfg.mtp_layers:
        # transformers' classes have no MTP module (they skip layers past num_hidden_layers), nor
        # has the remote code: the export is the main model, and says so.
        prefix = f"blocks.{cfg.n_layers}."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        cfg = replace_mtp_layers(cfg, 0)
        notes.append(f"multi-token prediction dropped: the MTP block ({prefix}*) is not exported, as transformers' "
                     f"classes have no place for it (num_nextn_predict_layers 0)")
    blockers = native_blockers(cfg, state)
    native = _native_choice(architecture, blockers, ckpt_path)
    if native is None and custom_blockers(cfg):
        natives = "; ".join(f"{ARCHS[n].display}: {', '.join(b)}" for n, b in blockers.items() if b)
        raise CheckpointError(f"the custom architecture's remote code cannot express the model of {ckpt_path!r} "
                              f"({', '.join(custom_blockers(cfg))}), and no native class can either ({natives})")
    token_ids = pad_token_ids(hf_token_ids(hf_tokenizer) if hf_tokenizer else special_token_ids(sp_model),
                              cfg.vocab_size)
    weight_dtype = state["embed.weight"].dtype
    with staged_directory(out, overwrite) as tmp:
        if native:
            config = hf_config(ARCHS[native], cfg, token_ids, dtype_name(weight_dtype))
            weights = native_state(native, cfg, state)
        else:
            config = custom_config(cfg, token_ids, weight_dtype)
            weights = custom_state({**state, **comet_mask_state(cfg, model_seed(ckpt.config))})
            copy_modeling_files(tmp)
        write_json(os.path.join(tmp, "config.json"), config)
        write_weights(os.path.join(tmp, "model.safetensors"), weights, SAFETENSORS, metadata={"format": "pt"})
        copied = copy_hf_tokenizer(hf_tokenizer, tmp)
        if not copied:
            write_tokenizer(sp_model, tmp, cfg.max_seq_len, cfg.vocab_size)
        write_generation_config(tmp, token_ids)
    return ExportResult(out=out, architecture=native or "custom", reasons=[] if native else blockers["mixtral"],
                        tokenizer=sp_model is not None or copied or cfg.vocab_size > BYTE_EOD,
                        blockers={} if native else blockers, notes=notes)
