"""The Triton kernels of `ft.models.decode_attention` (imported only where Triton is).

`split_kv_partial`: program (row x KV head, split) runs an online softmax over its
stretch of keys for the G query heads of that KV head; with one split it writes the
normalised output, otherwise the unnormalised output and the row max and sum (base-2
exponent) for `split_kv_combine` to merge.
"""

import triton
import triton.language as tl


@triton.jit
def split_kv_partial(
    Q, Keys, Values, Allowed, Out, PartO, PartM, PartL,
    stride_qb, stride_qk, stride_qg,
    stride_kb, stride_kk, stride_ks,
    stride_vb, stride_vk, stride_vs,
    stride_ab,
    stride_ob, stride_ok, stride_og,
    num_kv_heads, G, H, S, keys_per_split, num_splits, scale_log2,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, DIRECT: tl.constexpr,
    IEEE: tl.constexpr,
):
    row_head = tl.program_id(0)
    split = tl.program_id(1)
    b = row_head // num_kv_heads
    kv_head = row_head % num_kv_heads
    g = tl.arange(0, BLOCK_G)
    h = tl.arange(0, BLOCK_H)
    s_tile = tl.arange(0, BLOCK_S)
    g_in = g < G
    h_in = h < H

    q = tl.load(Q + b * stride_qb + kv_head * stride_qk + g[:, None] * stride_qg + h[None, :],
                mask=g_in[:, None] & h_in[None, :], other=0.0)
    k_base = Keys + b * stride_kb + kv_head * stride_kk
    v_base = Values + b * stride_vb + kv_head * stride_vk
    a_base = Allowed + b * stride_ab

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_H], dtype=tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, S)
    # Scalar loop bounds (keys_per_split is a whole number of tiles); tiles past S load nothing.
    for offset in range(0, keys_per_split, BLOCK_S):
        s = start + offset + s_tile
        s_in = s < end
        allowed = tl.load(a_base + s, mask=s_in, other=0) != 0
        k = tl.load(k_base + s[:, None] * stride_ks + h[None, :], mask=s_in[:, None] & h_in[None, :], other=0.0)
        if IEEE:  # float32 inputs: full-precision products, not TF32
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            scores = tl.dot(q, tl.trans(k)) * scale_log2
        scores = tl.where(allowed[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with no allowed key yet keeps max -inf: subtract 0 then, not -inf (NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + s[:, None] * stride_vs + h[None, :], mask=s_in[:, None] & h_in[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if DIRECT:
        out = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + kv_head * stride_ok + g[:, None] * stride_og + h[None, :],
                 out.to(Out.dtype.element_ty), mask=g_in[:, None] & h_in[None, :])
    else:
        part = row_head * num_splits + split
        tl.store(PartO + (part * BLOCK_G + g[:, None]) * BLOCK_H + h[None, :], acc)
        tl.store(PartM + part * BLOCK_G + g, m_i)
        tl.store(PartL + part * BLOCK_G + g, l_i)


@triton.jit
def split_kv_combine(
    PartO, PartM, PartL, Out,
    stride_ob, stride_ok, stride_og,
    num_kv_heads, G, H, num_splits,
    BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    row_head = tl.program_id(0)
    b = row_head // num_kv_heads
    kv_head = row_head % num_kv_heads
    sp = tl.arange(0, BLOCK_SPLITS)
    g = tl.arange(0, BLOCK_G)
    h = tl.arange(0, BLOCK_H)
    sp_in = sp < num_splits
    part_SG = (row_head * num_splits + sp[:, None]) * BLOCK_G + g[None, :]
    m_SG = tl.load(PartM + part_SG, mask=sp_in[:, None], other=float("-inf"))
    l_SG = tl.load(PartL + part_SG, mask=sp_in[:, None], other=0.0)
    m_G = tl.max(m_SG, 0)
    m_G = tl.where(m_G == float("-inf"), 0.0, m_G)
    w_SG = tl.math.exp2(m_SG - m_G[None, :])  # 0 for splits with no allowed key
    l_G = tl.sum(w_SG * l_SG, 0)
    o_SGH = tl.load(PartO + part_SG[:, :, None] * BLOCK_H + h[None, None, :], mask=sp_in[:, None, None], other=0.0)
    out = tl.sum(w_SG[:, :, None] * o_SGH, 0) / l_G[:, None]
    tl.store(Out + b * stride_ob + kv_head * stride_ok + g[:, None] * stride_og + h[None, :],
             out.to(Out.dtype.element_ty), mask=(g < G)[:, None] & (h < H)[None, :])
