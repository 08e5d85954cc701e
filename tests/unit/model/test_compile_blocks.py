"""`train.compile`: every block compiled on its own (fullgraph in one process) computes what the
eager model computes, keeps its parameter names, and traces one graph per kind of block."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from tests.harness.compiled import assert_steps_match

from moe_dist.common.config import ConfigError
from moe_dist.model.compile import compile_blocks
from moe_dist.model.config import ModelConfig
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.config import MoEConfig
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.train.config import TrainSection


def _model(**moe) -> MoETransformer:
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=4, n_heads=2, d_ff=64, max_seq_len=16, moe_every=2,
                      moe_offset=1, moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2, **moe))
    return MoETransformer(cfg, seed=3)


@pytest.mark.parametrize("moe", [{}, {"dropless": True, "num_shared_experts": 1}], ids=["capacity", "dropless-shared"])
def test_compiled_blocks_match_eager(moe):
    torch._dynamo.reset()
    counters.clear()
    eager = _model(**moe)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, ParallelGroups.single())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    assert_steps_match(eager, compiled, tokens, tokens)
    # Two dense and two MoE blocks: one graph per kind, reused by the second block of each kind
    # (a graph per block would be four, a recompile each step more).
    assert counters["stats"]["unique_graphs"] == 2


def test_compiled_latent_attention_blocks_match_eager():
    """Multi-head latent attention with a low-rank query and YaRN, dense first layer, sigmoid
    router with shared experts (the DeepSeek-V3 layout): fullgraph, as eager."""
    torch._dynamo.reset()
    counters.clear()
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=2, d_ff=64, max_seq_len=16, moe_offset=1,
                      attention="mla", q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6,
                      v_head_dim=5, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 8,
                                                  "mscale_all_dim": 1.0},
                      moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2, dropless=True, num_shared_experts=1,
                                    router={"type": "topk", "score": "sigmoid", "bias_balancing": True,
                                            "scale": 2.5}))
    eager = MoETransformer(cfg, seed=3)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, ParallelGroups.single())
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    assert_steps_match(eager, compiled, tokens, tokens)
    assert counters["stats"]["unique_graphs"] == 2  # one dense, one MoE block


def test_compile_option_is_a_bool():
    with pytest.raises(ConfigError, match="train.compile must be true or false, got 'yes'"):
        TrainSection(steps=1, seq_len=8, micro_batch=1, deepspeed_config="ds.json", compile="yes")


def test_a_router_that_cannot_train_compiled_is_refused_before_compiling():
    model = _model(router={"type": "inhibition", "mode": "divisive", "stat": "ema"})
    with pytest.raises(ConfigError, match=r"train.compile: blocks\.1\.moe\.router.*'divisive'.*cannot be trained "
                                          r"under torch.compile"):
        compile_blocks(model, ParallelGroups.single())
    compile_blocks(_model(router={"type": "inhibition", "mode": "divisive", "stat": "batch"}), ParallelGroups.single())


@pytest.mark.slow
def test_compiled_blocks_with_mtp_and_group_limited_routing_match_eager():
    """The MTP block (blocks[n_layers], an MoE block on S - 1 positions) compiles with the others;
    DeepSeek-V3's routing (2 of 4 groups, sigmoid, bias, renormalized, scaled) traces whole."""
    torch._dynamo.reset()
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16, moe_every=1,
                      moe_offset=1, mtp_layers=1,
                      moe=MoEConfig(d_model=32, d_ff=32, num_experts=8, top_k=2, dropless=True,
                                    router={"type": "topk", "score": "sigmoid", "bias_balancing": True,
                                            "renormalize": True, "scale": 2.5, "expert_groups": 4,
                                            "topk_groups": 2}))
    eager = MoETransformer(cfg, seed=3)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, ParallelGroups.single())
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    assert_steps_match(eager, compiled, tokens, tokens)
    torch.testing.assert_close(compiled(tokens, tokens).mtp_loss, eager(tokens, tokens).mtp_loss)
