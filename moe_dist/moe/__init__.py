"""The MoE layer: router -> capacity slots -> dispatch -> grouped experts -> combine.

Shape legend, for every file of `moe_dist/moe`, `moe_dist/routing` and `moe_dist/model`: a tensor
named `x_TD` has dims [T, D]. Each letter has one meaning (case matters: E and e differ).

    B  sequences in a batch            S  positions in a sequence         T  tokens on this rank
    D  model width                     V  vocabulary                      H  attention heads
    A  width of one attention head     R  rotary frequencies (A / 2)      L  label (domain) classes
    E  experts (global)                e  experts on this rank (E / P)    P  ranks in the EP group
    K  experts chosen per token        C  capacity (slots per expert)     Q  routed pairs (T * K)
    N  kept pairs this rank sends      M  rows this rank's experts run    U  rows the experts gather
    F  expert hidden width (one SwiGLU branch)                               from (T at EP 1, else M)
    I  width of the experts' first projection (2F: SwiGLU's gate and up fused; F with GELU)
    G  tokens of one capacity group    X  tokens sub-sampled for the sample-similarity loss
    J  width of the attentive gate (trunk, query, probes, keys: the paper's h)
    Z  shared directions removed by `inhibition`'s subspace mode (`router.rank`)
    Y  key/value heads (`model.n_kv_heads`; Y = H without grouped-query attention)
    W  key positions attended to in generation (the KV cache's past positions + the new ones)
    c  latent attention's key-value latent (`kv_lora_rank`)    l  its query latent (`q_lora_rank`)
    r  rotary width of a latent-attention head                  n  its non-rotary query/key width
    o  value width of a latent-attention head (`v_head_dim`)
    O  segments a balance loss averages over (sequences, packed documents or capacity groups)

Persistent parameters and buffers (state-dict keys, hence checkpoint keys) are named by the
shape of the whole, consolidated tensor: `GroupedExperts.w_in_EDI` holds a rank's [e, D, I] slice
of the [E, D, I] tensor that a consolidated checkpoint stores under that name. Names from before
that rule are migrated on load (`moe_dist.moe.legacy_names`).

Kernels (`moe_dist/kernels`) are generic in their operands and spell their widths out (`rows`,
`in_width`, `out_width`) instead of borrowing these letters.
"""
