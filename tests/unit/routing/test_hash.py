"""The `hash` router (docs/routers/hash.md): balanced tables (seeded and frequency-packed), routes
that depend on the token id alone, a table the checkpoint carries, `moe.hash_layers` mixing hash
and learned layers in one model, and its config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.routing.base import RoutingContext
from moe_dist.routing.hash import HashRouter, expected_load, frequency_table, seeded_table
from moe_dist.routing.topk import TopKRouter

V, D, E = 97, 16, 8
MODEL = dict(vocab_size=V, d_model=D, n_layers=3, n_heads=2, d_ff=24, max_seq_len=16)


def layer_cfg(router: dict | None = None, **kw) -> MoEConfig:
    base = dict(d_model=D, d_ff=12, num_experts=E, top_k=2, min_capacity=1)
    return MoEConfig.from_dict({**base, **kw, "router": {"type": "hash", "vocab_size": V, **(router or {})}})


def ids_per_expert(table_VK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(table_VK.reshape(-1), minlength=num_experts)


def rows_distinct(table_VK: torch.Tensor) -> bool:
    s = table_VK.sort(dim=1).values
    return bool((s[:, 1:] != s[:, :-1]).all())


@pytest.mark.parametrize("vocab,experts,k", [(96, 8, 1), (97, 8, 2), (1000, 6, 4), (61, 7, 3), (50, 4, 4)])
def test_seeded_table_gives_every_expert_vocab_k_over_e_ids_in_distinct_rows(vocab, experts, k):
    table = seeded_table(vocab, experts, k, torch.Generator().manual_seed(3))
    assert table.shape == (vocab, k) and table.dtype == torch.int64
    assert int(table.min()) >= 0 and int(table.max()) < experts
    assert rows_distinct(table)
    per_expert = ids_per_expert(table, experts)
    assert int(per_expert.sum()) == vocab * k
    # Floor or ceiling of V*K/E: exactly V*K/E when E divides it.
    assert int(per_expert.min()) == vocab * k // experts
    assert int(per_expert.max()) == -(-vocab * k // experts)


def test_seeded_table_is_a_function_of_the_seed():
    a = seeded_table(V, E, 2, torch.Generator().manual_seed(1))
    assert torch.equal(a, seeded_table(V, E, 2, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, seeded_table(V, E, 2, torch.Generator().manual_seed(2)))
    # Rows differ across permutations: not the same E/K expert groups repeated.
    assert len({tuple(sorted(r)) for r in a.tolist()}) > E // 2


def test_the_layer_table_is_seeded_by_router_seed_and_layer_index_not_the_global_rng():
    torch.manual_seed(0)
    table = MoELayer(layer_cfg(), seed=5, layer_index=3).router.table_VK
    torch.manual_seed(123)
    assert torch.equal(MoELayer(layer_cfg(), seed=6, layer_index=3).router.table_VK, table)
    assert not torch.equal(MoELayer(layer_cfg(), seed=5, layer_index=4).router.table_VK, table)
    assert not torch.equal(MoELayer(layer_cfg({"seed": 1}), seed=5, layer_index=3).router.table_VK, table)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_frequency_table_expected_loads_are_equal_within_one_tokens_count(k):
    rng = np.random.default_rng(0)
    counts = (rng.pareto(1.2, V) * 50).astype(np.int64)  # heavy-tailed, as token frequencies are
    counts[::9] = 0  # ids the training data never shows
    table = frequency_table(counts, E, k)
    assert table.shape == (V, k) and rows_distinct(table)
    load = expected_load(table, counts, E)
    assert int(load.sum()) == int(counts.sum()) * k
    assert int(load.max() - load.min()) <= int(counts.max()), (load, counts.max())
    # Far better than the seeded table on the same counts (which ignores them).
    seeded = expected_load(seeded_table(V, E, k, torch.Generator().manual_seed(0)), counts, E)
    assert int(load.max() - load.min()) < int(seeded.max() - seeded.min())
    # Unseen ids are dealt out evenly, not piled on the lightest experts.
    unseen = ids_per_expert(table[torch.from_numpy(counts == 0)], E)
    assert int(unseen.max() - unseen.min()) <= 1


def test_frequency_table_packs_a_known_case_exactly():
    # Counts 6, 5, 4, 3 on two experts at K=1: LPT puts {6, 3} and {5, 4}: loads 9 and 9.
    table = frequency_table(np.array([3, 6, 4, 5]), 2, 1)
    assert table[:, 0].tolist() == [0, 0, 1, 1]
    assert expected_load(table, np.array([3, 6, 4, 5]), 2).tolist() == [9, 9]


def test_routes_depend_on_the_token_id_alone_with_uniform_weights():
    layer = MoELayer(layer_cfg(), seed=0)
    ids = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(1))
    ctx = RoutingContext(training=True, token_ids_T=ids)
    a = layer.router(torch.randn(40, D), ctx)
    b = layer.router(torch.randn(40, D) * 5, ctx)
    assert torch.equal(a.idx_TK, b.idx_TK)
    assert torch.equal(a.idx_TK, layer.router.table_VK[ids])
    assert torch.equal(a.w_TK, torch.full((40, 2), 0.5))
    assert a.probs_TE is None and a.logits_TE is None
    # The same id at any position of any context gets the same experts.
    first = {}
    for v, row in zip(ids.tolist(), a.idx_TK.tolist()):
        assert first.setdefault(v, row) == row
    k1 = MoELayer(layer_cfg(top_k=1), seed=0).router(torch.randn(40, D), ctx)
    assert torch.equal(k1.w_TK, torch.ones(40, 1))


def test_no_learned_parameter_no_aux_loss_and_gradient_reaches_only_the_experts():
    layer = MoELayer(layer_cfg(), seed=0)
    assert list(layer.router.parameters()) == []
    ids = torch.randint(0, V, (32,))
    x = torch.randn(32, D, requires_grad=True)
    out = layer(x, MoESideInputs(token_ids_T=ids))
    assert out.aux_loss is None and out.losses == {}
    assert "tokens_per_expert" in out.stats and "entropy_token" not in out.stats
    out.y.square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.experts.parameters())


def test_table_is_a_persistent_int64_buffer_untouched_by_casts_and_loaded_exactly():
    layer = MoELayer(layer_cfg(), seed=0)
    assert "router.table_VK" in layer.state_dict()
    table = layer.router.table_VK.clone()
    layer.to(torch.bfloat16)
    assert layer.router.table_VK.dtype == torch.int64 and torch.equal(layer.router.table_VK, table)
    other = MoELayer(layer_cfg({"seed": 9}), seed=0)
    assert not torch.equal(other.router.table_VK, table)
    other.load_state_dict(MoELayer(layer_cfg(), seed=0).state_dict())
    assert torch.equal(other.router.table_VK, table)


def test_frequency_router_builds_its_table_from_the_counts_file(tmp_path):
    counts = np.random.default_rng(1).integers(0, 1000, V)
    path = str(tmp_path / "counts.npy")
    np.save(path, counts)
    router = MoELayer(layer_cfg({"table": "frequency", "token_counts": path}), seed=0).router
    assert torch.equal(router.table_VK, frequency_table(counts, E, 2))


def test_a_frequency_table_without_its_counts_file_routes_only_once_loaded(tmp_path):
    cfg = layer_cfg({"table": "frequency", "token_counts": str(tmp_path / "absent.npy")})
    layer = MoELayer(cfg, seed=0)  # builds: evaluation and export load the table from a checkpoint
    side = MoESideInputs(token_ids_T=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"absent\.npy.*does not exist.*no checkpoint was loaded"):
        layer(torch.randn(4, D), side)
    state = layer.state_dict()
    state["router.table_VK"] = seeded_table(V, E, 2, torch.Generator().manual_seed(0))
    layer.load_state_dict(state)
    layer(torch.randn(4, D), side)


@pytest.mark.parametrize("array,match", [
    (np.zeros(V - 1, dtype=np.int64), r"shape \[96\], expected \[97\]"),
    (np.zeros(V, dtype=np.float32), "float32 values, expected integer"),
    (np.full(V, -2, dtype=np.int64), "negative count"),
])
def test_a_bad_counts_file_is_refused_naming_it(tmp_path, array, match):
    path = str(tmp_path / "counts.npy")
    np.save(path, array)
    with pytest.raises(ConfigError, match=match) as e:
        MoELayer(layer_cfg({"table": "frequency", "token_counts": path}), seed=0)
    assert path in str(e.value)


def test_forward_without_token_ids_says_what_to_pass():
    layer = MoELayer(layer_cfg(), seed=0)
    with pytest.raises(ValueError, match="token_ids_T"):
        layer(torch.randn(4, D))
    with pytest.raises(ValueError, match="3 token ids for 4 tokens"):
        layer(torch.randn(4, D), MoESideInputs(token_ids_T=torch.zeros(3, dtype=torch.int64)))


@pytest.mark.parametrize("router,match", [
    ({"table": "learned"}, r"router.table must be one of \['seeded', 'frequency'\], got 'learned'"),
    ({"table": "frequency"}, "router.table frequency needs router.token_counts"),
    ({"token_counts": "c.npy"}, "router.token_counts \\('c.npy'\\) is read only with router.table frequency"),
    ({"seed": 1.5}, "router.seed must be an integer"),
    ({"vocab_size": 0}, "router.vocab_size must be an integer >= 1"),
    ({"weights": "softmax"}, r"unknown key\(s\) \['weights'\]"),
])
def test_router_config_errors_name_the_key(router, match):
    with pytest.raises(ConfigError, match=match):
        layer_cfg(router)


def test_a_layer_built_without_a_vocabulary_is_refused():
    cfg = MoEConfig.from_dict(dict(d_model=D, d_ff=12, num_experts=E, router={"type": "hash"}))
    with pytest.raises(ConfigError, match="router.vocab_size"):
        MoELayer(cfg, seed=0)


def model_cfg(model: dict | None = None, **moe):
    return parse_model_config({**MODEL, **(model or {})}, dict(num_experts=E, d_ff=12, top_k=2, **moe))


def test_hash_layers_route_the_first_moe_layers_by_hash_and_the_rest_by_the_configured_router():
    cfg = model_cfg(dict(n_layers=4, moe_offset=1), hash_layers=2, router={"type": "topk"},
                    hash_router={"type": "hash", "seed": 4})
    assert cfg.moe.hash_router.vocab_size == V  # filled in from model.vocab_size
    model = MoETransformer(cfg, seed=0)
    routers = {i: type(moe.router) for i, moe in model.moe_layers()}
    assert routers == {1: HashRouter, 2: HashRouter, 3: TopKRouter}
    assert {f"blocks.{i}.moe.router.table_VK" for i in (1, 2)} <= set(model.state_dict())
    assert model.blocks[1].moe.router.cfg.seed == 4
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(tokens, tokens)
    out.loss.backward()
    assert model.blocks[3].moe.router.gate.weight_ED.grad is not None
    assert set(out.moe_stats[1]) < set(out.moe_stats[3])  # no probabilities, no loss entries
    # The hash layers route by the model's input ids: the same experts as the table says.
    counts = torch.zeros(E).index_add_(0, model.blocks[1].moe.router.table_VK[tokens.reshape(-1)].reshape(-1),
                                       torch.ones(tokens.numel() * 2))
    torch.testing.assert_close(out.moe_stats[1]["tokens_per_expert"], counts)
    # A copy built with another table seed takes this model's tables from its state dict.
    copy = MoETransformer(model_cfg(dict(n_layers=4, moe_offset=1), hash_layers=2,
                                    hash_router={"type": "hash", "seed": 7}), seed=0)
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy(tokens).logits_BSV, model(tokens).logits_BSV, rtol=0, atol=0)


def test_a_hash_router_on_every_layer_and_generation_route_by_token_id():
    from moe_dist.model.generation import SamplingConfig, generate
    model = MoETransformer(model_cfg(router={"type": "hash"}), seed=0).eval()
    assert all(isinstance(moe.router, HashRouter) for _, moe in model.moe_layers())
    prompt = [3, 5, 7]
    out = generate(model, [prompt], SamplingConfig(max_new_tokens=3, temperature=0.0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(3):
            seq.append(int(model(torch.tensor([seq])).logits_BSV[0, -1].argmax()))
    assert out[0] == seq[len(prompt):]


@pytest.mark.parametrize("model,moe,match", [
    ({}, dict(hash_layers=4), r"moe.hash_layers \(4\) exceeds the model's 3 MoE layers"),
    ({}, dict(hash_layers=-1), "moe.hash_layers must be an integer >= 0, got -1"),
    ({}, dict(hash_router={"type": "hash"}), "moe.hash_router is set but moe.hash_layers is 0"),
    ({}, dict(hash_layers=1, router={"type": "hash"}), "moe.router is already 'hash'"),
    ({}, dict(hash_layers=1, hash_router={"type": "topk"}), "moe.hash_router.type must be 'hash', got 'topk'"),
    ({}, dict(hash_layers=1, hash_router={"type": "hash", "vocab_size": 50}),
     r"moe.hash_router.vocab_size \(50\) must equal model.vocab_size \(97\)"),
    ({}, dict(router={"type": "hash", "vocab_size": 50}), r"moe.router.vocab_size \(50\) must equal"),
    ({}, dict(hash_layers=1, hash_router={"type": "hash", "tabel": "seeded"}),
     r"moe.hash_router\[hash\]: unknown key\(s\) \['tabel'\]"),
])
def test_hash_layers_config_errors_name_the_key(model, moe, match):
    with pytest.raises(ConfigError, match=match):
        model_cfg(model, **moe)


def test_memory_estimates_build_hash_layers_on_the_meta_device():
    from moe_dist.train.memory_plan import parameter_counts

    hashed = model_cfg(hash_layers=2)
    dense, expert = parameter_counts(hashed)
    dense_topk, expert_topk = parameter_counts(model_cfg())
    # Two MoE layers without a gate: 2 * E * D fewer dense parameters, the same experts.
    assert (dense_topk - dense, expert) == (2 * E * D, expert_topk)
