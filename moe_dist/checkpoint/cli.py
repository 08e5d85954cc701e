"""Command line of tools/convert_checkpoint.py: one parser with a subcommand per conversion, and
what `inspect` prints. Conversion errors (CheckpointError) print one line naming the file and exit
with status 2.

`inspect` prints what a checkpoint holds (moe_dist/checkpoint/inspect.py) and, for a training
checkpoint, whether the tag is complete and the directory's tags (`tag_report`); a partial tag (a
save that did not finish) or one whose files disagree exits with status 3 (EXIT_INCOMPLETE),
whatever it holds.
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_dist.checkpoint.consolidated import META_FILE, consolidate, open_checkpoint
from moe_dist.checkpoint.files import DTYPES, WEIGHT_FORMATS, CheckpointError, read_json
from moe_dist.checkpoint.hf.arch import ARCHS
from moe_dist.checkpoint.hf.exporter import ARCHITECTURES, export_hf
from moe_dist.checkpoint.hf.importer import MTP_CHOICES, RUN_CONFIG_FILE, import_hf
from moe_dist.checkpoint.inspect import format_summary, summarize, summary_json
from moe_dist.checkpoint.training import reshard, tag_report
from moe_dist.checkpoint.upcycle import SLICE_SCALES, upcycle
from moe_dist.common.atomic import make_output_folder
from moe_dist.common.config import ConfigError

MTP_NOTES = {"imported": "multi-token prediction: the checkpoint's MTP module imported (model.mtp_layers 1)",
             "dropped": "multi-token prediction: the checkpoint's MTP weights left out (--mtp drop)",
             "fresh": "multi-token prediction: a freshly initialised MTP block added (model.mtp_layers 1)"}

EXIT_INCOMPLETE = 3  # inspect: the tag is partial or its files disagree

CKPT_HELP = ("a training checkpoint directory (uses its 'latest' tag unless --tag) or one tag directory; "
             "inspect and export-hf also take a consolidated directory")
DESCRIPTION = """Convert moe_dist checkpoints. Outputs are written to a temporary sibling of OUT and
renamed into place only when the whole conversion succeeded; OUT must not exist (or --overwrite).

  inspect      print layers, experts, routers, the EP/world size it was saved with, dtypes,
               parameter counts (total and active per token), step and config
  consolidate  one world-size-independent state dict (experts stacked [E, ...] under global ids,
               the ep_size=1 model's names) + moe_dist.json; load it with
               moe_dist.checkpoint.load_consolidated(model, OUT) at any EP size
  reshard      the checkpoint for another expert-parallel size / world size, optimizer state
               included; resume from it with --set moe.ep_size=N --set train.checkpoint_dir=OUT
  export-hf    a Hugging Face directory: a native class (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)
               when one expresses the model exactly, else custom modeling code
               (trust_remote_code=True)
  import-hf    a local Hugging Face directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; dense
               Llama, Qwen2, Qwen3) -> a consolidated checkpoint + OUT/run_config.yaml
  upcycle      a dense model (moe_dist checkpoint or local HF Llama/Qwen2/Qwen3 directory) into a
               consolidated MoE checkpoint that computes the dense function at step 0; train it
               with train.init_from=OUT
"""


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("ckpt", metavar="CKPT", help=CKPT_HELP)
    if out:
        p.add_argument("out", metavar="OUT", help="output directory (must not exist)")
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only after success)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tag", default=None, help="checkpoint tag (e.g. step_00001000) instead of 'latest'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="summarize a checkpoint", description="Summarize a checkpoint: "
                       "layers, experts per layer, ep_size and world size it was saved with, router types, "
                       "dtypes, parameter counts (total and active per token), step and config.")
    _common(p, out=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("consolidate", help="one world-size-independent state dict",
                       description="Merge every EP rank's experts (and, with --master-weights, the ZeRO-1/2 "
                       "fp32 master partitions) into the ep_size=1 model's state dict: OUT/model.safetensors "
                       "(or model.pt) and OUT/moe_dist.json.")
    _common(p)
    p.add_argument("--master-weights", action="store_true",
                   help="take parameters from the optimizer's fp32 master weights (ZeRO partitions) instead of "
                        "the module weights (they differ under bf16); buffers always come from the module")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast floating tensors (default: as saved)")
    p.add_argument("--format", choices=WEIGHT_FORMATS, default="safetensors", dest="fmt")

    p = sub.add_parser("reshard", help="change the expert-parallel size (and world size)",
                       description="Write the checkpoint as a run with --ep-size (and --world-size) would have: "
                       "weights re-sliced, ZeRO optimizer partitions (fp32 master weights, Adam moments) rebuilt "
                       "for the new layout, LR scheduler and step carried over. OUT is a checkpoint directory "
                       "with 'latest'.")
    _common(p)
    p.add_argument("--ep-size", type=int, required=True, help="new expert-parallel size")
    p.add_argument("--world-size", type=int, default=None, help="new world size (default: unchanged)")

    p = sub.add_parser("export-hf", help="a Hugging Face transformers directory",
                       description="Write config.json, model.safetensors and tokenizer files (SentencePiece or "
                       "Hugging Face tokenizers). The native MixtralForCausalLM, Qwen2MoeForCausalLM, "
                       "Qwen3MoeForCausalLM or OlmoeForCausalLM when one computes the model exactly "
                       "(docs/checkpoints.md), else a self-contained custom architecture loaded with "
                       "trust_remote_code=True.")
    _common(p)
    p.add_argument("--architecture", choices=ARCHITECTURES, default="auto",
                   help="auto: the first native class that expresses the model, else custom code; a native "
                        "name: fail unless it does; custom: always custom code")
    p.add_argument("--master-weights", action="store_true", help="as for consolidate")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors")
    p.add_argument("--tokenizer-model", default=None,
                   help="the SentencePiece .model file, if it moved since training (checked by sha256)")

    p = sub.add_parser("import-hf", help="a local Hugging Face model -> a consolidated checkpoint",
                       description="Read a local Hugging Face directory (config.json and safetensors, one file or "
                       "sharded with model.safetensors.index.json; nothing is downloaded) of "
                       f"{', '.join(a.hf_class for a in ARCHS.values())} and write OUT as a consolidated "
                       f"checkpoint (train.init_from reads it) plus OUT/{RUN_CONFIG_FILE}, a run config for "
                       "continued pretraining. A config.json field moe_dist cannot compute exactly is an error "
                       "naming it; every tensor's shape is checked against config.json before any is read.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="local Hugging Face model directory")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only after success)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--mtp", choices=MTP_CHOICES, default="auto",
                   help="multi-token prediction (DeepSeek-V3's layer num_hidden_layers): auto (default) imports it "
                        "where the checkpoint has one (model.mtp_layers 1) and adds none where it has none; drop "
                        "leaves it out; fresh adds a freshly initialised MTP block to a checkpoint without one")
    _add_upcycle(sub)
    return parser


def _add_upcycle(sub) -> int:
    p = sub.add_parser("upcycle", help="a dense model into an MoE model (sparse upcycling)",
                       description="Every chosen FFN layer becomes an MoE layer whose experts are copies of the "
                       "dense FFN (or, with --granularity G, of its G hidden-unit slices), with a renormalized "
                       "top-k router initialised so that the MoE model computes the dense model's function at "
                       "step 0 (dropless). Writes a consolidated checkpoint; see docs/checkpoints.md, upcycle.")
    p.add_argument("ckpt", metavar="SRC", help="a dense moe_dist checkpoint (consolidated or training directory) "
                   "or a local Hugging Face Llama/Qwen2/Qwen3 directory")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist)")
    p.add_argument("--num-experts", type=int, required=True, help="experts per MoE layer (copies x granularity)")
    p.add_argument("--top-k", type=int, required=True, help="experts per token (a multiple of --granularity)")
    p.add_argument("--granularity", type=int, default=1,
                   help="split the dense FFN's hidden units into G slices, each expert one slice (Megatron's "
                        "--moe-upcycling-granularity); default 1: every expert a full copy")
    p.add_argument("--router-std", type=float, default=None,
                   help="std of the random router rows (default 1/sqrt(d_model), a fresh topk router's)")
    p.add_argument("--expert-noise", type=float, default=0.0,
                   help="Gaussian noise per expert, relative to each dense weight's std (default 0: step 0 exact)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router rows and the noise")
    p.add_argument("--moe-every", type=int, default=1, help="every N-th FFN layer becomes MoE (default 1: all)")
    p.add_argument("--moe-offset", type=int, default=0, help="the first MoE layer (default 0)")
    p.add_argument("--slice-scale", choices=SLICE_SCALES, default="router",
                   help="with G > 1, where the factor G goes: the router's scale (default) or the experts' "
                        "output projections")
    p.add_argument("--tag", default=None, help="tag of a training checkpoint SRC instead of 'latest'")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only after success)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    progress = not getattr(args, "quiet", False)
    if getattr(args, "out", None):
        make_output_folder(args.out)  # OUT's parent, as `mkdir -p`: `import-hf HF out/olmoe` on a fresh clone
    if args.command == "inspect":
        report = tag_report(args.ckpt, args.tag)
        bad = report is not None and bool(report["problems"])
        try:
            summary = summarize(open_checkpoint(args.ckpt, args.tag))
        except CheckpointError as e:
            if not bad:
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            summary = {"kind": "training", "path": args.ckpt}
        if report is not None:
            summary["tag_status"] = report
        if "step" in summary:
            print(summary_json(summary) if args.json else format_summary(summary))
        elif args.json:
            print(summary_json(summary))
        if bad:
            for problem in report["problems"]:
                print(f"error: {problem}", file=sys.stderr, flush=True)
            return EXIT_INCOMPLETE
    elif args.command == "consolidate":
        consolidate(args.ckpt, args.out, tag=args.tag, master_weights=args.master_weights, dtype=args.dtype,
                    fmt=args.fmt, overwrite=args.overwrite, progress=progress)
        print(f"wrote consolidated checkpoint {args.out}")
    elif args.command == "reshard":
        result = reshard(args.ckpt, args.out, ep_size=args.ep_size, world_size=args.world_size, tag=args.tag,
                         overwrite=args.overwrite, progress=progress)
        print(f"wrote {result.out} (tag {result.tag}): ep_size {result.ep_size}, world size {result.world_size}, "
              f"optimizer state resharded")
        for note in result.notes:
            print(f"  - {note}")
    elif args.command == "export-hf":
        result = export_hf(args.ckpt, args.out, tag=args.tag, architecture=args.architecture,
                           master_weights=args.master_weights, dtype=args.dtype,
                           tokenizer_model=args.tokenizer_model, overwrite=args.overwrite, progress=progress)
        how = (f"{ARCHS[result.architecture].hf_class} (no custom code)" if result.architecture in ARCHS
               else "custom MoEDistForCausalLM (load with trust_remote_code=True)")
        print(f"wrote {result.out}: {how}{', tokenizer files' if result.tokenizer else ''}")
        for name, reasons in result.blockers.items():
            for reason in reasons:
                print(f"  - not {ARCHS[name].display}: {reason}")
        for note in result.notes:
            print(f"  - {note}")
    elif args.command == "import-hf":
        import_hf(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=progress, mtp=args.mtp)
        print(f"wrote consolidated checkpoint {args.out} and its run config {args.out}/{RUN_CONFIG_FILE}")
        note = MTP_NOTES.get(read_json(os.path.join(args.out, META_FILE), "checkpoint metadata")["source"]["mtp"])
        if note:
            print(f"  - {note}")
    elif args.command == "upcycle":
        result = upcycle(args.ckpt, args.out, args.num_experts, args.top_k, args.granularity, tag=args.tag,
                         overwrite=args.overwrite, progress=progress, router_std=args.router_std,
                         expert_noise=args.expert_noise, seed=args.seed, moe_every=args.moe_every,
                         moe_offset=args.moe_offset, slice_scale=args.slice_scale)
        print(f"wrote {result.out}: {args.num_experts} experts, top-{args.top_k}, granularity {args.granularity} "
              f"on layers {result.moe_layers} ({result.num_parameters:,} parameters) from the {result.source_kind} "
              f"model {args.ckpt}; train it with train.init_from={result.out} (a run config: "
              f"{result.out}/{RUN_CONFIG_FILE})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
