"""The CPU backend's MKL side (`moe_dist/kernels/cpu/mkl_grouped.py`): MKL's batch GEMM, separate
GEMMs for large segments, the chunked backward of the gather-fused first projection, and the
layouts its raw segment GEMMs read and write."""

import pytest
import torch
from tests.harness.gemm_check import assert_mkl_matches_the_loop, needs_mkl

from moe_dist.common.tensor_memory import peak_tensor_mb
from moe_dist.kernels import grouped_mm
from moe_dist.kernels.cpu import mkl_grouped


@needs_mkl
@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [0, 0, 0, 0], [16, 0, 0, 0]])
def test_mkl_grouped_matmul_gradients_match_the_loop(counts):
    """MKL's batch GEMM path (forward, input grad, weight grad; empty experts get zero weight
    grads) against per-expert matmuls, on fresh random data."""
    w = torch.randn(4, 12, 20)
    mkl_grads = assert_mkl_matches_the_loop(torch.randn(sum(counts), 12), w, counts)
    assert torch.equal(mkl_grads[torch.tensor(counts) == 0], torch.zeros_like(w[torch.tensor(counts) == 0]))


@needs_mkl
def test_large_segments_are_gemms_of_their_own(monkeypatch):
    """Segments of at least OWN_GEMM_ROWS_PER_THREAD rows per thread run as separate GEMMs over
    every thread; only the others go to the batch call. Both kinds in one call agree with the
    per-expert loop in the forward, the input gradient and the weight gradient."""
    monkeypatch.setattr(mkl_grouped, "OWN_GEMM_ROWS_PER_THREAD", 8 / torch.get_num_threads())
    batched = []
    real_call = mkl_grouped._call
    monkeypatch.setattr(mkl_grouped, "_call", lambda *a: (batched.append(a[2].tolist()), real_call(*a)))
    counts = [9, 3, 0, 8, 1]  # 9 and 8 rows: their own GEMMs; 3, 0 and 1: batched
    assert_mkl_matches_the_loop(torch.randn(21, 12), torch.randn(5, 12, 20), counts)
    # forward, input gradient: rows per batched GEMM; weight gradient: its BLAS k is the rows
    assert batched[0] == [3, 0, 1] and batched[1] == [3, 0, 1], batched
    assert len(batched) == 3 and sorted(batched[2]) == [12, 12, 12], batched


def test_backward_chunks_hold_enough_experts_for_one_batch_call():
    chunks = mkl_grouped._expert_chunks
    counts = [10] * 40
    # 8 chunks of 50 rows would be 5 experts each; at least 16 experts per chunk: 16, 16, 8
    assert [(e0, e1) for e0, e1, _, _ in chunks(counts, 8, 16)] == [(0, 16), (16, 32), (32, 40)]
    assert [(r0, r1) for _, _, r0, r1 in chunks(counts, 8, 16)] == [(0, 160), (160, 320), (320, 400)]
    # a segment big enough for a GEMM of its own closes its chunk early
    big = mkl_grouped.OWN_GEMM_ROWS_PER_THREAD * torch.get_num_threads()
    assert [(e0, e1) for e0, e1, _, _ in chunks([big, big, 1, 1], 4, 16)] == [(0, 1), (1, 2), (2, 4)]


@needs_mkl
def test_gather_segment_matmul_matches_gather_then_matmul(monkeypatch):
    """The fused gather (chunked, gradient added straight into the source rows) against
    index_select + per-expert matmuls: duplicate rows (top-2), an empty expert, several chunks."""
    monkeypatch.setattr(mkl_grouped._GatherSegmentMatmul, "CHUNKS", 3)
    counts = [6, 0, 9, 3, 4]
    source = torch.randn(15, 12)
    index = torch.randint(0, 15, (sum(counts),))
    w = torch.randn(5, 12, 20)
    grad_y = torch.randn(sum(counts), 20)
    fused = [source.clone().requires_grad_(), w.clone().requires_grad_()]
    y = mkl_grouped.gather_segment_matmul(fused[0], index, fused[1], counts)
    y.backward(grad_y)
    plain = [source.clone().requires_grad_(), w.clone().requires_grad_()]
    y_ref = grouped_mm(plain[0].index_select(0, index), plain[1], counts, "loop")
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@needs_mkl
def test_segment_ops_read_expanded_stacks_in_place_and_write_only_contiguous_ones():
    """An expanded weight stack (every expert the same matrix) is read without materialising it.
    A weight gradient is written only into a contiguous stack: an expanded buffer, which
    tools/bench/expert_gemms.py writes for its cached variant, and other layouts are refused."""
    experts, in_width, out_width = 2048, 64, 64  # the expanded stacks would be 32 MiB as copies
    counts = [1] * experts
    x, g, w = torch.randn(experts, in_width), torch.randn(experts, out_width), torch.randn(in_width, out_width)
    stack = w.expand(experts, in_width, out_width)
    y = torch.empty(experts, out_width)
    assert peak_tensor_mb(lambda: mkl_grouped.segment_mm(x, stack, counts, False, out=y)) < 1
    torch.testing.assert_close(y, x @ w, rtol=1e-5, atol=1e-5)
    assert peak_tensor_mb(lambda: mkl_grouped.segment_mm(g, stack, counts, True, out=x)) < 1
    shared = torch.empty(in_width, out_width).expand(experts, in_width, out_width)
    for out in (shared, torch.empty(experts, out_width, in_width).transpose(1, 2)):
        with pytest.raises(ValueError, match=r"out must be a contiguous \[2048, 64, 64\] tensor"):
            mkl_grouped.segment_outer(x, g, counts, out=out)


@needs_mkl
def test_gather_backward_holds_one_chunk_at_a_time():
    """The chunked backward frees each chunk's [rows, D] temporaries (its regathered rows, then
    its input gradient) before the next one exists: its peak is the two gradients it returns plus
    one such temporary. A name left bound to a chunk's input gradient adds a second."""
    experts, rows_each, d_model, width = 32, 128, 64, 256
    source = torch.randn(2048, d_model, requires_grad=True)
    index = torch.randint(0, 2048, (experts * rows_each,))
    w = torch.randn(experts, d_model, width, requires_grad=True)
    counts = [rows_each] * experts
    chunks = mkl_grouped._expert_chunks(counts, mkl_grouped._GatherSegmentMatmul.CHUNKS,
                                        mkl_grouped._GatherSegmentMatmul.MIN_EXPERTS_PER_CHUNK)
    assert len(chunks) == 2
    grad = torch.randn(experts * rows_each, width)
    mib = 2.0**-20 * 4  # fp32 bytes -> MiB
    chunk_rows = max(r1 - r0 for _, _, r0, r1 in chunks)
    returned = (source.numel() + w.numel()) * mib
    one_temporary = chunk_rows * d_model * mib

    def backward():
        y = mkl_grouped.gather_segment_matmul(source, index, w, counts)
        return peak_tensor_mb(lambda: y.backward(grad))

    backward()  # warm: one-time allocations (the kernels' self-checks) are not the step's
    source.grad = w.grad = None
    peak = backward()
    assert peak <= returned + one_temporary + 0.05, (peak, returned, one_temporary)
