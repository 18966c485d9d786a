"""A roofline cost model for the schedule planner, in predicted seconds.

Every kernel the schedule runs is a dense GEMM, a batched GEMM or a strided copy, so a
step costs ``flops / peak + bytes / bandwidth + overhead`` (additive roofline), plus
page-fault time for memory the step touches for the first time.

GEMM time is a max-roofline: compute at ``s / (s + gemm_half)`` of peak for a GEMM whose
smallest dimension is ``s``, or its memory traffic, whichever is slower. Permutes that the
C kernel takes (``kernels.py``: the token axis stays outermost) are priced apart.

The machine's constants — GEMM peak and half-width, bandwidths, per-op overhead, first-touch
cost — are one :class:`Machine` value, the first argument of every price: :mod:`calibrate`
measures them on the CPU with a short micro-benchmark and the :class:`tuning.Tuning` that
plans holds them; ``SHIPPED``, the values of one development machine, prices where nothing is
measured (``QCIRCUIT_TUNE=0``: reproducible plans). The dimensionless factors below (permute
patterns against a copy, batched-GEMM penalties) are ratios measured once and shipped.
Absolute predictions may be off by a roughly constant factor; the planner needs the *ranking*
of variants, which the ratios between constants decide. Between routes the model only
prunes: the survivors are timed on the machine and the fastest kept (:mod:`choice`). Every
function is pure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """The model's machine constants, and what they were measured on."""

    peak_flops: float       # float32 GEMM throughput for wide GEMMs (flop/s)
    gemm_half: float        # a GEMM whose smallest dimension is this wide runs at half of peak
    bandwidth: float        # effective streaming bandwidth for GEMM operands (bytes/s)
    copy_bandwidth: float   # contiguous copy, read+write bytes/s
    overhead: float         # dispatch cost of one torch op (s)
    fault_per_byte: float   # first touch of freshly mapped memory (s/byte)
    cpu: str = "shipped"    # the CPU model it holds for
    threads: int = 0        # torch's thread count when measured
    torch_version: str = ""


SHIPPED = Machine(peak_flops=1.85e11, gemm_half=30.0, bandwidth=1.2e10, copy_bandwidth=1.2e10,
                  overhead=1.5e-5, fault_per_byte=3.0e-10,
                  cpu="shipped defaults (a 2-core Intel Xeon)", threads=2)

GEMM_SLOW_FORM = 1.35   # GEMMs reading the big operand transposed (prefix, rotations)
PERMUTE_RUN = 1.1       # permute keeping the innermost axis: this many contiguous copies
PERMUTE_LOCAL = 1.9     # innermost axis moves, but every gather stays in a small region
PERMUTE_MID = 3.5       # short contiguous runs gathered from all over the tensor
PERMUTE_FAR = 13.0      # gathers spread over the whole tensor (TLB-bound, e.g. moving tokens)
LOCAL_BYTES = 1 << 18   # "small region" for a permute's gathers
BATCH_NARROW = 24       # batched GEMMs with narrower right matrices run this/n slower
BATCH_FEW = 8           # batched GEMMs over fewer matrices run this/batch slower
TRANSPOSED_OUT = 0.5    # extra output passes when a GEMM reads or writes transposed
SPLIT_GRAM_ROWS = 8192  # a gate gradient Σ gyᵀx over this many rows or more is split over
                        # row blocks when the gate is narrow (see gram_factor)
KERNEL_PERMUTE = 0.8    # the C permute kernel, in plain copies as this model prices them
FUSED_PERMUTE = 0.1     # a permute inside the fused gate kernel, in plain copies (see fused_copy)
SERIAL_NUMEL = 1 << 16  # a schedule whose activations are at most this many elements runs on
                        # one thread (see runs_serial)


def gemm(mc: Machine, m: int, n: int, k: int, itemsize: int = 4,
         transposed_out: bool = False) -> float:
    """(m×k)·(k×n): one BLAS call, the slower of its compute and its memory traffic. Compute
    runs at ``s / (s + gemm_half)`` of peak, ``s`` its smallest dimension."""
    data = (m * k + k * n + m * n) * itemsize
    small = min(m, n, k)
    t = max(2.0 * m * n * k / (mc.peak_flops * small / (small + mc.gemm_half)),
            data / mc.bandwidth)
    return t * (GEMM_SLOW_FORM if transposed_out else 1.0) + mc.overhead


def batched_gemm(mc: Machine, batch: int, m: int, n: int, k: int, itemsize: int = 4) -> float:
    """``batch`` products (m×k)·(k×n) with one shared left matrix (a gate on middle axes).
    As fast as the single GEMM with the same flops when every right matrix is at least
    ``BATCH_NARROW`` columns wide and there are at least ``BATCH_FEW`` of them; narrower or
    fewer run proportionally slower (measured at 512 tokens, 32–128-wide gates: 0.8–1.2× the
    suffix GEMM for n ≥ 32, 1.2–1.6× at n = 16, 2–3× at n = 8, 1.7–2.2× for 4 matrices)."""
    return (gemm(mc, batch * n, m, k, itemsize) * max(1.0, BATCH_NARROW / n)
            * max(1.0, BATCH_FEW / batch))


def batched_gram(mc: Machine, batch: int, m: int, n: int, s: int,
                 itemsize: int = 4) -> tuple[float, bool]:
    """A batched step's gate gradient ``Σ_b gy[b] · x[b]ᵀ`` ((m×s)·(s×n) per batch): the cost,
    and whether a batched product summed over the batch beats one tensordot (which copies
    both operands into a single GEMM). The batched product pays for its ``batch·m·n``
    partial products and runs slowly when its inner dimension ``s`` is short."""
    by_bmm = (gemm(mc, m, n, batch * s, itemsize) * max(1.0, 2 * BATCH_NARROW / s)
              + copy(mc, batch * m * n, itemsize, 1.0))
    by_tensordot = (copy(mc, batch * m * s, itemsize) + copy(mc, batch * n * s, itemsize)
                    + gemm(mc, m, n, batch * s, itemsize))
    return min(by_bmm, by_tensordot), by_bmm < by_tensordot


def copy(mc: Machine, numel: int, itemsize: int = 4, factor: float = PERMUTE_LOCAL) -> float:
    """Copy ``numel`` elements, ``factor`` times slower than a contiguous copy."""
    return 2.0 * numel * itemsize / mc.copy_bandwidth * factor + mc.overhead


def gram_factor(width: int, rows: int) -> float:
    """Time of a gate gradient ``Σ gyᵀx`` (``width`` = the gate's wider side, summed over
    ``rows``) split over row blocks, as a fraction of one GEMM; 1.0 where it is not split.
    BLAS splits the small output, not the long sum, across threads; a batched product over
    row blocks keeps every thread busy. Measured: 0.67–0.80 for 32- and 64-wide gates; for
    128-wide 0.83–1.1 between runs (not split), none for 256-wide, a loss under ~8192 rows."""
    return 0.78 if rows >= SPLIT_GRAM_ROWS and width <= 64 else 1.0


def fused_copy(mc: Machine, numel: int, itemsize: int = 4) -> float:
    """A permute gathered block by block inside the fused gate kernel (:mod:`fused`): the
    permuted activation never leaves L2. Measured at 512 tokens: forward 0.1–0.15 of the
    separate kernel copy it replaces, backward nothing (the blocked gate gradient gains
    back more than the scatter costs)."""
    return copy(mc, numel, itemsize, FUSED_PERMUTE)


def runs_serial(numel: int) -> bool:
    """Whether a schedule whose largest activation has ``numel`` elements should run on the
    calling thread alone: its ~30 ops are so small that waking a second thread for each costs
    more than it saves. Measured (paper circuit, 2 threads against 1): 1 token 1.32 vs 0.92 ms
    (minimum), 16 tokens equal minimum and 11 % slower median, 64 tokens 8.9 vs 12.7 ms."""
    return numel <= SERIAL_NUMEL


def kernel_copy(mc: Machine, numel: int, itemsize: int = 4) -> float:
    """A permute within token slabs by the C kernel (:mod:`kernels`): measured 1.2–1.7× a
    plain copy beside it whatever the pattern (ATen: 2.4–6.8×); ``KERNEL_PERMUTE`` expresses
    that against the copy bandwidth, calibrated on a busier machine than those runs."""
    return copy(mc, numel, itemsize, KERNEL_PERMUTE)


def permute_factor(shape: tuple[int, ...], perm: tuple[int, ...], itemsize: int = 4) -> float:
    """How much slower than a plain copy ``x.view(shape).permute(perm)`` copies out.

    The copy walks the output in order. The output's trailing axes that are also the input's
    trailing axes, in order, are contiguous runs; runs of a cache line or more copy nearly at
    full speed. Otherwise take the innermost input axis outside the run: every output element
    (run) after it in the output comes from a different "stream". Few streams, or streams in
    a small region, stay cheap; many streams over the whole tensor are TLB-bound and very
    slow (moving the token axis across the qudits)."""
    dims = [(a, d) for a, d in enumerate(shape) if d > 1]
    in_order = [a for a, _ in dims]
    out_order = [a for a in perm if shape[a] > 1]
    if not dims or in_order == out_order:
        return 1.0
    run = 0
    while run < len(in_order) and in_order[-1 - run] == out_order[-1 - run]:
        run += 1
    run_axes = set(in_order[len(in_order) - run:])
    run_bytes = math.prod(shape[a] for a in run_axes) * itemsize
    if run_bytes >= 1024:
        return PERMUTE_RUN
    anchor = in_order[len(in_order) - run - 1]
    after = [a for a in out_order[out_order.index(anchor) + 1:] if a not in run_axes]
    if math.prod(shape[a] for a in after) <= 64:
        return PERMUTE_RUN + 0.2
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    span = max(shape[a] * strides[a] for a in after) * itemsize
    if span <= LOCAL_BYTES:
        return PERMUTE_LOCAL
    return PERMUTE_MID if run_bytes >= 64 else PERMUTE_FAR


def fresh(mc: Machine, numel: int, itemsize: int = 4) -> float:
    """Page faults for a freshly allocated buffer (large ones are mmapped and zeroed)."""
    nbytes = numel * itemsize
    return nbytes * mc.fault_per_byte if nbytes >= (1 << 20) else 0.0


def small_matmuls(mc: Machine, sizes: list[tuple[int, int, int]]) -> float:
    """Small GEMMs that build fused gate matrices (forward, and two for backward)."""
    return 3.0 * sum(gemm(mc, m, n, k) for m, n, k in sizes)


def einsum_reference(mc: Machine, tokens: int, in_dims: tuple[int, ...], gates,
                     itemsize: int = 4) -> float:
    """Rough cost of one opt_einsum expression run with torch autograd: every pairwise
    contraction is a tensordot (permute the activation, GEMM into a fresh buffer), forward
    then two of each in backward."""
    dims = list(in_dims)
    total = 0.0
    for g in gates:
        numel = tokens * math.prod(dims)
        k_in, k_out = g.in_size, g.out_size
        rows = numel // k_in
        for q, d in zip(g.qudits, g.out_dims):
            dims[q] = d
        out_numel = rows * k_out
        step = (copy(mc, numel, itemsize, PERMUTE_LOCAL) + gemm(mc, rows, k_out, k_in, itemsize)
                + fresh(mc, out_numel, itemsize))
        back = (copy(mc, out_numel, itemsize, PERMUTE_LOCAL) + gemm(mc, rows, k_in, k_out, itemsize)
                + fresh(mc, numel, itemsize) + gemm(mc, k_out, k_in, rows, itemsize)
                + copy(mc, numel, itemsize, PERMUTE_LOCAL))
        total += step + back
    return total

