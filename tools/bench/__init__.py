"""moe_dist's benchmarks and its GPU acceptance kit, run from the repository root as
`python -m tools.bench.<name> --help` (results and how to read them: BENCHMARKS.md).

Commands:
  moe            one MoE layer's forward+backward time and peak memory: moe_dist vs DeepSpeed's
                 MoE (vs Megatron-Core's on CUDA) vs the dense GEMM floor
  expert_gemms   the layer's six expert GEMMs against the floor's, weights streamed vs cached
  recompute      peak memory of an all-MoE model under each `model.moe_recompute` mode
  kernel_trial   the per-machine AVX-512-vs-MKL trial's verdict against a direct timing of the
                 backend's own calls, per round (for reading; tests never assert times)
  gpu_check      checks and measures moe_dist on one GPU (`--quick`: tiny sizes on CPU)
  hot_expert_memory   one layer's peak memory at EP 2 with and without a receive budget, balanced
                 and with one hot expert
  routing_trace  what the routing trace costs a training step, and its file size
  checkpoint_digest   what the sha256 digests of a checkpoint tag cost, through the launcher

Pieces the commands share:
  spec           the layer a benchmark builds and the flags that set it
  layers         the layers compared, built with the same weights and routing
  megatron       Megatron-Core's MoE layer as a case of `moe`, with the fastest expert MLP that builds
  timing         interleaved timing rounds; a case that fails is dropped with its reason
  inject         failures made on purpose (`--fail-reference`)
  step_memory    peak memory of one step in a fresh child process (CPU)
  gpu_check_correctness, gpu_check_ep, gpu_check_pretrain   the parts of `gpu_check`
"""
