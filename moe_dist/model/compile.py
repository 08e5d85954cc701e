"""`train.compile`: each transformer block compiled on its own, as torchtitan's `apply_compile` does.

Per block rather than the whole model: the blocks share one structure, so dynamo traces it once
per kind (dense, MoE) and reuses the graph for every layer (parameters are graph inputs, not
constants), and a recompile of one block never recompiles the embedding, the head or the loss.
`nn.Module.compile` compiles in place, so parameter names, state dicts, checkpoints and
DeepSpeed's view of the model are unchanged.

`fullgraph`: where the block's forward holds no collective (one process, or no data- or
expert-parallel peer the MoE layer talks to in its forward) the whole block must compile as one
graph, and a graph break is an error rather than a silent fallback to eager. With peers, the MoE
layer's all-to-all (and a global-count loss's all-reduce) stay outside the compiled regions: the
collective seam is excluded from tracing (`moe_dist/parallel/collectives.py`), so dynamo breaks
the graph around it and compiles what lies between.
"""

from __future__ import annotations

from moe_dist.common.config import ConfigError
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel.groups import ParallelGroups


def block_has_collective(groups: ParallelGroups) -> bool:
    """Whether a block's forward talks to other ranks: the MoE layer's all-to-all over the EP group
    and the all-reduces over data parallel (a global-count loss, a router's population statistics)."""
    return groups.world_size > 1


def compile_blocks(model: MoETransformer, groups: ParallelGroups) -> None:
    """Compile every block of `model` in place (`train.compile`, docs/training.md). A module that
    cannot train compiled (`trains_under_compile` False) is refused here, before the engine and
    the first step, with its own reason."""
    for name, module in model.named_modules():
        if getattr(module, "trains_under_compile", True) is False:
            raise ConfigError(f"train.compile: {name}: {module.compile_refusal()}")
    fullgraph = not block_has_collective(groups)
    for block in model.blocks:
        block.compile(fullgraph=fullgraph)
