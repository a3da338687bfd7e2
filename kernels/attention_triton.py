"""Attention's Triton path: the flash-attention kernels, their autotuning and their launchers.

Forward keeps a running max and sum per query row (online softmax) and saves only q, k, v,
out and the per-row log-sum-exp (lse, fp32, [B,H,Nq]). Backward recomputes the probabilities
block by block from lse: one kernel per key block (and query range, where there are too few
key blocks to fill the GPU: _query_splits) accumulates dK/dV and adds its share of dQ with
fp32 atomics; when torch asks for deterministic algorithms, a second kernel per query block
computes dQ instead (_one_pass_backward).

Causal masking is top-left aligned like SDPA's is_causal: query i sees keys j <= i, also
when Nq != Nk. Accumulation is fp32 for every input dtype. Head dims that are not a power
of two (SD 1.x: 40, 80, 160) are covered by two power-of-two column pieces rather than one
tile padded with zeros (configs.head_pieces).

attn_fwd, attn_bwd_delta, attn_bwd_dkdv and attn_bwd_dq are the JIT kernels
bench/compile_targets.py compiles for every target; forward and backward launch them, and
minti.kernels.flash_attention calls those two.
"""
from __future__ import annotations

import inspect

import torch

import minti.kernels.configs as configs
from minti.kernels.attention_torch import token_major, token_major_output
from minti.kernels.launch import INTERPRETED, new_output

try:  # Triton is optional (no wheels for macOS): flash_attention then takes attention_torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """tl.dot with fp32 accumulation. "upcast": Triton's numpy interpreter multiplies bf16
        operands wrongly, so there they are widened first (already rounded, so the numbers
        match the GPU's bf16 tensor-core product up to summation order)."""
        if PRECISION == "upcast":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _tile(base, rows, row_ok, s_row, s_col, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr,
              MASK_ROWS: tl.constexpr):
        """Rows `rows`, columns [COL0, COL0 + WIDTH) of a [N, D] matrix; zero past N (when
        MASK_ROWS) and past D (a piece wider than what is left of the head dim)."""
        cols = COL0 + tl.arange(0, WIDTH)
        ok = cols[None, :] < D
        if MASK_ROWS:
            ok = ok & row_ok[:, None]
        return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col, mask=ok, other=0.0)

    @triton.jit
    def _both_pieces(base, rows, row_ok, s_row, s_col, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr):
        """Rows `rows` of a [N, D] matrix as its (lo, hi) head-dim pieces; hi is lo when D_HI == 0."""
        lo = _tile(base, rows, row_ok, s_row, s_col, 0, D_LO, D, True)
        hi = lo
        if D_HI > 0:
            hi = _tile(base, rows, row_ok, s_row, s_col, D_LO, D_HI, D, True)
        return lo, hi

    @triton.jit
    def _dot_rows_of(x_lo, x_hi, base, rows, row_ok, s_row, s_col, D: tl.constexpr, D_LO: tl.constexpr,
                     D_HI: tl.constexpr, PRECISION: tl.constexpr):
        """x @ y^T over the head dim's one or two pieces, where y is rows `rows` of the [N, D]
        matrix at `base` (loaded here) -> (x @ y^T, y_lo, y_hi); y_hi is y_lo when D_HI == 0."""
        y_lo = _tile(base, rows, row_ok, s_row, s_col, 0, D_LO, D, True)
        out = _dot(x_lo, tl.trans(y_lo), PRECISION)
        y_hi = y_lo
        if D_HI > 0:
            y_hi = _tile(base, rows, row_ok, s_row, s_col, D_LO, D_HI, D, True)
            out += _dot(x_hi, tl.trans(y_hi), PRECISION)
        return out, y_lo, y_hi

    @triton.jit
    def _store_tile(base, x, rows, row_ok, s_row, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr):
        cols = COL0 + tl.arange(0, WIDTH)
        tl.store(base + rows[:, None] * s_row + cols[None, :], x.to(base.dtype.element_ty),
                 mask=row_ok[:, None] & (cols[None, :] < D))

    @triton.jit
    def _atomic_add_tile(base, x, rows, row_ok, s_row, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr):
        cols = COL0 + tl.arange(0, WIDTH)
        tl.atomic_add(base + rows[:, None] * s_row + cols[None, :], x, mask=row_ok[:, None] & (cols[None, :] < D))

    @triton.jit
    def _head_bases(Q, K, V, X, H, sqb, sqh, skb, skh, svb, svh, sxb, sxh):
        """Pointers to this program's (batch, head) slice of q, k, v and a fourth [B,H,N,D]
        tensor (O in the forward, dO in the backward); program_id(1) is batch * H + head."""
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        return Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh, X + b * sxb + h * sxh

    @triton.jit
    def _block_rows(BLOCK: tl.constexpr, N):
        """Row indices of this program's block (program_id 0) and which are < N."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        return offs, offs < N

    # The head dim is covered by one or two power-of-two pieces (tl.arange and tl.dot need
    # powers of two): D_LO columns, then D_HI more when D_HI > 0. D = 80 is 64 + 16 instead of
    # one 128-wide tile padded with zeros, 160 is 128 + 32, 40 is 32 + 16 (see head_pieces).
    # Every product over the head dim is the sum of the two pieces' products; every product
    # into it (P V, dS K, ...) is computed per piece. With D_HI = 0 the "hi" names are unused.

    @triton.jit
    def _fwd_block(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_base, v_base, skn, skd, svn, svd, start_n, offs_m,
                   offs_n, Nk, qk_scale, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                   MASK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
        """One key block of the online softmax. MASK_N=False for blocks fully inside the
        valid (and, if causal, visible) region: no per-row masking on the hot path."""
        kn = start_n + offs_n
        n_ok = kn < Nk
        k_lo = _tile(k_base, kn, n_ok, skn, skd, 0, D_LO, D, MASK_N)
        s = _dot(q_lo, tl.trans(k_lo), PRECISION)
        if D_HI > 0:
            k_hi = _tile(k_base, kn, n_ok, skn, skd, D_LO, D_HI, D, MASK_N)
            s += _dot(q_hi, tl.trans(k_hi), PRECISION)
        s = s * qk_scale
        if MASK_N:
            ok = n_ok[None, :]
            if CAUSAL:
                ok = ok & (kn[None, :] <= offs_m[:, None])
            s = tl.where(ok, s, float("-inf"))
        # Key 0 is always visible (top-left causal), so m_new is finite after block 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_lo = _tile(v_base, kn, n_ok, svn, svd, 0, D_LO, D, MASK_N)
        acc_lo = acc_lo * alpha[:, None] + _dot(p.to(v_lo.dtype), v_lo, PRECISION)
        if D_HI > 0:
            v_hi = _tile(v_base, kn, n_ok, svn, svd, D_LO, D_HI, D, MASK_N)
            acc_hi = acc_hi * alpha[:, None] + _dot(p.to(v_hi.dtype), v_hi, PRECISION)
        return acc_lo, acc_hi, m_new, l_i

    @triton.jit
    def attn_fwd(Q, K, V, O, LSE,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                  H, Nq, Nk, scale,
                  CAUSAL: tl.constexpr, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_m, m_ok = _block_rows(BLOCK_M, Nq)
        offs_n = tl.arange(0, BLOCK_N)
        q_base, k_base, v_base, o_base = _head_bases(Q, K, V, O, H, sqb, sqh, skb, skh, svb, svh, sob, soh)
        q_lo = _tile(q_base, offs_m, m_ok, sqm, sqd, 0, D_LO, D, True)
        acc_lo = tl.zeros([BLOCK_M, D_LO], tl.float32)
        q_hi, acc_hi = q_lo, acc_lo  # placeholders, unused unless D_HI > 0
        if D_HI > 0:
            q_hi = _tile(q_base, offs_m, m_ok, sqm, sqd, D_LO, D_HI, D, True)
            acc_hi = tl.zeros([BLOCK_M, D_HI], tl.float32)
        qk_scale = scale * 1.4426950408889634  # work in base 2: exp2 is the fast instruction
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        # Key blocks [0, full_end) need no mask; [full_end, hi) do (ragged tail, diagonal).
        hi = Nk
        full_end = (Nk // BLOCK_N) * BLOCK_N
        if CAUSAL:
            pid_m = tl.program_id(0)
            hi = tl.minimum(Nk, (pid_m + 1) * BLOCK_M)
            full_end = tl.minimum(full_end, ((pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N)
        for start_n in range(0, full_end, BLOCK_N):
            acc_lo, acc_hi, m_i, l_i = _fwd_block(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_base, v_base, skn, skd,
                                                  svn, svd, start_n, offs_m, offs_n, Nk, qk_scale,
                                                  D, D_LO, D_HI, False, CAUSAL, PRECISION)
        for start_n in range(full_end, hi, BLOCK_N):
            acc_lo, acc_hi, m_i, l_i = _fwd_block(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_base, v_base, skn, skd,
                                                  svn, svd, start_n, offs_m, offs_n, Nk, qk_scale,
                                                  D, D_LO, D_HI, True, CAUSAL, PRECISION)
        o_ptrs = o_base + offs_m[:, None] * som
        cols = tl.arange(0, D_LO)
        tl.store(o_ptrs + cols[None, :] * sod, (acc_lo / l_i[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None] & (cols[None, :] < D))
        if D_HI > 0:
            cols = D_LO + tl.arange(0, D_HI)
            tl.store(o_ptrs + cols[None, :] * sod, (acc_hi / l_i[:, None]).to(O.dtype.element_ty),
                     mask=m_ok[:, None] & (cols[None, :] < D))
        # lse in natural-log units, the same as the torch path: (m + log2 l) * ln 2.
        bh = tl.program_id(1)
        tl.store(LSE + bh * Nq + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=m_ok)

    @triton.jit
    def attn_bwd_delta(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, Nq,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        """delta = rowsum(dO * O), the softmax-backward correction term (fp32). Memory-bound:
        one padded power-of-two tile is as good as two pieces here."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh * Nq + offs_m, delta, mask=offs_m < Nq)

    @triton.jit
    def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ,
                       sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                       H, Nq, Nk, scale, SPLITS,
                       CAUSAL: tl.constexpr, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                       DQ_ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program per key block and query range (program_id 2 of SPLITS): loop over the
        range's query blocks that can see the key block. With SPLITS > 1, DK/DV are fp32
        [SPLITS, B*H, Nk, D] partial sums that the launcher adds up. With DQ_ATOMIC it also
        adds this key block's share of dQ = dS K into DQ (fp32, zeroed first) with atomics;
        without, attn_bwd_dq computes dQ in a second pass."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        offs_n, n_ok = _block_rows(BLOCK_N, Nk)
        q_base, k_base, v_base, do_base = _head_bases(Q, K, V, DO, H, sqb, sqh, skb, skh, svb, svh, sdb, sdh)
        k_lo, k_hi = _both_pieces(k_base, offs_n, n_ok, skn, skd, D, D_LO, D_HI)
        v_lo, v_hi = _both_pieces(v_base, offs_n, n_ok, svn, svd, D, D_LO, D_HI)
        dk_lo = tl.zeros([BLOCK_N, D_LO], tl.float32)
        dv_lo = tl.zeros([BLOCK_N, D_LO], tl.float32)
        if D_HI > 0:
            dk_hi = tl.zeros([BLOCK_N, D_HI], tl.float32)
            dv_hi = tl.zeros([BLOCK_N, D_HI], tl.float32)
        qk_scale = scale * 1.4426950408889634
        per_split = tl.cdiv(tl.cdiv(Nq, BLOCK_M), SPLITS) * BLOCK_M
        lo = tl.program_id(2) * per_split
        hi = tl.minimum(Nq, lo + per_split)
        if CAUSAL:  # queries before this key block cannot see it
            lo = tl.maximum(lo, ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Nq
            q_lo = _tile(q_base, offs_m, m_ok, sqm, sqd, 0, D_LO, D, True)
            do_lo = _tile(do_base, offs_m, m_ok, sdm, sdd, 0, D_LO, D, True)
            lse = tl.load(LSE + bh * Nq + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + bh * Nq + offs_m, mask=m_ok, other=0.0)
            # Transposed scores [BLOCK_N, BLOCK_M] so dK/dV accumulate without transposing them.
            # (Both lo tiles load before the products: in this order the sm_75 compile of the
            # deterministic pass at D = 160 keeps within its registers, which _dot_rows_of's
            # load-multiply-load order does not.)
            st = _dot(k_lo, tl.trans(q_lo), PRECISION)
            dpt = _dot(v_lo, tl.trans(do_lo), PRECISION)
            q_hi, do_hi = q_lo, do_lo  # placeholders, unused unless D_HI > 0
            if D_HI > 0:
                q_hi = _tile(q_base, offs_m, m_ok, sqm, sqd, D_LO, D_HI, D, True)
                do_hi = _tile(do_base, offs_m, m_ok, sdm, sdd, D_LO, D_HI, D, True)
                st += _dot(k_hi, tl.trans(q_hi), PRECISION)
                dpt += _dot(v_hi, tl.trans(do_hi), PRECISION)
            pt = tl.math.exp2(st * qk_scale - lse[None, :])
            ok = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= offs_m[None, :])
            pt = tl.where(ok, pt, 0.0)
            dst = (pt * (dpt - delta[None, :])).to(q_lo.dtype)
            pt = pt.to(do_lo.dtype)
            dv_lo += _dot(pt, do_lo, PRECISION)
            dk_lo += _dot(dst, q_lo, PRECISION)
            if D_HI > 0:
                dv_hi += _dot(pt, do_hi, PRECISION)
                dk_hi += _dot(dst, q_hi, PRECISION)
            if DQ_ATOMIC:
                ds = tl.trans(dst)  # [BLOCK_M, BLOCK_N]
                dq_base = DQ + bh * Nq * D
                _atomic_add_tile(dq_base, _dot(ds, k_lo, PRECISION) * scale, offs_m, m_ok, D, 0, D_LO, D)
                if D_HI > 0:
                    _atomic_add_tile(dq_base, _dot(ds, k_hi, PRECISION) * scale, offs_m, m_ok, D, D_LO, D_HI, D)
        part = (tl.program_id(2) * tl.num_programs(1) + bh) * Nk * D
        dk_base = DK + part
        dv_base = DV + part
        _store_tile(dk_base, dk_lo * scale, offs_n, n_ok, D, 0, D_LO, D)
        _store_tile(dv_base, dv_lo, offs_n, n_ok, D, 0, D_LO, D)
        if D_HI > 0:
            _store_tile(dk_base, dk_hi * scale, offs_n, n_ok, D, D_LO, D_HI, D)
            _store_tile(dv_base, dv_hi, offs_n, n_ok, D, D_LO, D_HI, D)

    @triton.jit
    def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                     H, Nq, Nk, scale,
                     CAUSAL: tl.constexpr, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program per query block: loop over every key block it sees."""
        offs_m, m_ok = _block_rows(BLOCK_M, Nq)
        q_base, k_base, v_base, do_base = _head_bases(Q, K, V, DO, H, sqb, sqh, skb, skh, svb, svh, sdb, sdh)
        q_lo, q_hi = _both_pieces(q_base, offs_m, m_ok, sqm, sqd, D, D_LO, D_HI)
        do_lo, do_hi = _both_pieces(do_base, offs_m, m_ok, sdm, sdd, D, D_LO, D_HI)
        dq_lo = tl.zeros([BLOCK_M, D_LO], tl.float32)
        if D_HI > 0:
            dq_hi = tl.zeros([BLOCK_M, D_HI], tl.float32)
        bh = tl.program_id(1)
        lse = tl.load(LSE + bh * Nq + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * Nq + offs_m, mask=m_ok, other=0.0)
        qk_scale = scale * 1.4426950408889634
        hi = Nk
        if CAUSAL:
            pid_m = tl.program_id(0)
            hi = tl.minimum(Nk, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Nk
            s, k_lo, k_hi = _dot_rows_of(q_lo, q_hi, k_base, offs_n, n_ok, skn, skd, D, D_LO, D_HI, PRECISION)
            dp, v_lo, v_hi = _dot_rows_of(do_lo, do_hi, v_base, offs_n, n_ok, svn, svd, D, D_LO, D_HI, PRECISION)
            p = tl.math.exp2(s * qk_scale - lse[:, None])
            ok = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(ok, p, 0.0)
            ds = (p * (dp - delta[:, None])).to(k_lo.dtype)
            dq_lo += _dot(ds, k_lo, PRECISION)
            if D_HI > 0:
                dq_hi += _dot(ds, k_hi, PRECISION)
        dq_base = DQ + bh * Nq * D
        _store_tile(dq_base, dq_lo * scale, offs_m, m_ok, D, 0, D_LO, D)
        if D_HI > 0:
            _store_tile(dq_base, dq_hi * scale, offs_m, m_ok, D, D_LO, D_HI, D)

    def _pruner(kind: str):
        """The autotuner's early prune: keep the configs of kind that fit the running GPU
        (configs.usable_configs), before any is compiled or timed."""
        def prune(candidates, named_args, **kwargs):
            q, d = named_args["Q"], kwargs.get("D", named_args.get("D"))
            limits = configs.device_limits(q.device)
            if limits is None:
                return candidates
            usable = set(configs.usable_configs(kind, d, q.dtype, limits))
            return [c for c in candidates if _config_tuple(c) in usable]
        return prune

    def _config_tuple(c) -> tuple[int, int, int, int]:
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    def _time_for_tuning(kernel_call, quantiles=(0.5, 0.2, 0.8), **_) -> list[float]:
        """The autotuner's timer: triton.testing.do_bench without its L2-flush buffer.

        Tuning runs inside the first training step, in the middle of the backward, where
        that buffer would sit on top of every saved activation, past the peak the memory
        plans budget for (sizes in bench/RESULTS.md). Without the flush every config is
        timed with the same warm L2, which keeps their ranking. Returns the requested
        quantiles of the per-run times in ms, as do_bench does.
        """
        kernel_call()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            kernel_call()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
        runs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(int(min(100, max(5, 25 / estimate_ms))))]  # about 25 ms of runs
        for start, end in runs:
            start.record()
            kernel_call()
            end.record()
        torch.cuda.synchronize()
        times = sorted(start.elapsed_time(end) for start, end in runs)
        return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]

    def _autotune(kind: str, extra_key=(), **options):
        candidates = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                      for m, n, w, s in configs.ATTENTION_CONFIGS[kind]]
        options.update(key=["Nq", "Nk", "D", "D_LO", *extra_key],  # D_LO: split and padded tiles tune apart
                       prune_configs_by={"early_config_prune": _pruner(kind)})
        accepted = inspect.signature(triton.autotune).parameters  # both are newer than Triton 3.0
        if "do_bench" in accepted:
            options["do_bench"] = _time_for_tuning
        if "cache_results" in accepted:  # tuned once per GPU and shape, kept in Triton's disk cache
            options["cache_results"] = True
        return triton.autotune(candidates, **options)

    _attn_fwd_tuned = _autotune("fwd")(attn_fwd)
    # Each timed run adds into DQ: the autotuner zeroes it before every run and once after.
    _attn_bwd_dkdv_tuned = _autotune("bwd_dkdv", ["DQ_ATOMIC"], reset_to_zero=["DQ"])(attn_bwd_dkdv)
    _attn_bwd_dq_tuned = _autotune("bwd_dq")(attn_bwd_dq)

# The interpreter runs every config it is given, so it gets fixed small blocks instead.
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}


def precision(dtype: torch.dtype) -> str:
    """The kernels' PRECISION constant for inputs of dtype: fp32 inputs get exact fp32 products
    (TF32 would break the fp32 accuracy promise)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if INTERPRETED else "tf32"  # "tf32" is ignored for fp16/bf16 operands


def _grid(rows: int, block_key: str, b: int, h: int, splits: int = 1):
    return lambda m: (triton.cdiv(rows, m[block_key]), b * h, splits)


def _pick(kernel, tuned, x: torch.Tensor):
    if x.is_cuda and not INTERPRETED:
        return tuned, {}
    return kernel, dict(_INTERPRET_BLOCKS)


# The backward in one pass per key block that also adds its share of dQ with fp32 atomics
# (5 matmuls per pair of blocks, probabilities computed once), as FlashAttention-2 does, or
# in two (a second pass per query block computes dQ: 7 matmuls, probabilities twice, but the
# sums come out the same every run). bench/attention.py times both ("minti_two_pass").
ONE_PASS_BACKWARD = True


def _one_pass_backward() -> bool:
    """One pass unless turned off or torch.use_deterministic_algorithms(True) asks for
    reproducible sums (atomics add in any order)."""
    return ONE_PASS_BACKWARD and not torch.are_deterministic_algorithms_enabled()


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _query_splits(q: torch.Tensor, nk: int) -> int:
    """How many query ranges the dK/dV kernel splits into.

    It runs one program per head and key block: B*H*ceil(Nk/64), which for cross-attention
    to 77 text tokens is 2 per head, 16 for SD 1.5 on a GPU with 100+ SMs. Splitting the
    query range gives about two programs per SM; each range keeps at least 256 query rows
    (at 64^2, 16 ranges: 256 programs), and its partial dK/dV (fp32, sizes in
    bench/RESULTS.md) is summed afterwards.
    """
    b, h, nq = q.shape[:3]
    wanted = triton.cdiv(2 * _sm_count(q.device), b * h * triton.cdiv(nk, 64))
    return max(1, min(wanted, nq // 256))


def piece_args(d: int) -> dict[str, int]:
    """The kernels' head-dim constants D_LO and D_HI for head dim d (configs.head_pieces)."""
    lo, hi = configs.head_pieces(d)
    return {"D_LO": lo, "D_HI": hi}


def forward(q, k, v, causal: bool, scale: float):
    """(out, lse) from the Triton forward, in the layout attention_torch.forward returns."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = token_major_output((b, h, nq, d), q.dtype, q.device)  # the kernel writes through strides
    lse = new_output((b, h, nq), torch.float32, q.device)
    fn, blocks = _pick(attn_fwd, _attn_fwd_tuned, q)
    fn[_grid(nq, "BLOCK_M", b, h)](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, nq, nk, scale, CAUSAL=causal, D=d, **piece_args(d), PRECISION=precision(q.dtype), **blocks)
    return out, lse


def backward(do, q, k, v, o, lse, causal: bool, scale: float):
    """(dq, dk, dv) from the saved tensors, in the layout every path returns."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    do = do.to(q.dtype)  # autograd hands back out.dtype; the dots need one dtype anyway
    delta = new_output((b, h, nq), torch.float32, q.device)
    attn_bwd_delta[(triton.cdiv(nq, 32), b * h)](
        o, do, delta, *o.stride(), *do.stride(), h, nq, D=d, BLOCK_D=configs.pow2_at_least_16(d), BLOCK_M=32)
    # dq/dk/dv are written contiguous; the kernels index them as [B*H, N, D].
    one_pass, splits = _one_pass_backward(), _query_splits(q, nk)
    if one_pass:
        dq = torch.zeros((b, h, nq, d), dtype=torch.float32, device=q.device)  # atomics add into it
    else:
        dq = new_output((b, h, nq, d), q.dtype, q.device)
    if splits > 1:  # one fp32 partial sum per query range
        dk = new_output((splits, b, h, nk, d), torch.float32, q.device)
        dv = new_output((splits, b, h, nk, d), torch.float32, q.device)
    else:
        dk = new_output((b, h, nk, d), k.dtype, q.device)
        dv = new_output((b, h, nk, d), v.dtype, q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    common = dict(CAUSAL=causal, D=d, **piece_args(d), PRECISION=precision(q.dtype))
    fn, blocks = _pick(attn_bwd_dkdv, _attn_bwd_dkdv_tuned, q)
    fn[_grid(nk, "BLOCK_N", b, h, splits)](q, k, v, do, lse, delta, dk, dv, dq, *strides, h, nq, nk, scale, splits,
                                           DQ_ATOMIC=one_pass, **common, **blocks)
    if splits > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    if not one_pass:
        fn, blocks = _pick(attn_bwd_dq, _attn_bwd_dq_tuned, q)
        fn[_grid(nq, "BLOCK_M", b, h)](q, k, v, do, lse, delta, dq, *strides, h, nq, nk, scale, **common, **blocks)
    # Contiguous [B*H, N, D] in the kernels; returned in the layout every path returns (the
    # copy the callers' head merge would otherwise make).
    return token_major(dq.to(q.dtype)), token_major(dk), token_major(dv)
