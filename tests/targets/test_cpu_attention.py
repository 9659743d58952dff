"""The CPU target's attention over the paged KV cache's pages (targets/cpu_attention.py) against
numpy, called as the cache's C++ side calls it: queries of several sequences, each with its own
pages (out of order in the pool, the last one partly filled), causal or not; output and lse."""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from ernie_compile.targets.cpu import CpuTarget
from ernie_compile.targets.cpu_attention import paged_prefill_attention

KV_HEADS, QO_HEADS, D, PAGE = 2, 4, 32, 16


@pytest.mark.parametrize("causal", [0, 1])
def test_paged_prefill_attention_matches_numpy(causal):
    rng = np.random.default_rng(causal)
    kv_lens, qo_lens = [37, 16, 5], [3, 1, 5]  # keys cached per sequence; new query rows per sequence
    npages = [-(-n // PAGE) for n in kv_lens]
    pool = rng.standard_normal((sum(npages) + 2, 2, KV_HEADS, PAGE, D)).astype(np.float32)
    page_values = rng.permutation(len(pool))[:sum(npages)].astype(np.int32)  # scattered in the pool
    page_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    last_page_len = np.array([n - (p - 1) * PAGE for n, p in zip(kv_lens, npages)], np.int32)
    q_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    q = rng.standard_normal((q_indptr[-1], QO_HEADS, D)).astype(np.float32)
    scale = 1 / np.sqrt(D)

    lib = tvm.compile(tvm.IRModule({"main": paged_prefill_attention(KV_HEADS, QO_HEADS, D, "float32", PAGE)
                                    .with_attr("global_symbol", "main")}), target=CpuTarget.from_spec(None).tvm)
    out = tvm.runtime.tensor(np.zeros_like(q))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    t = tvm.runtime.tensor
    lib["main"](t(q), t(q_indptr), t(pool), t(page_indptr), t(page_values), t(last_page_len),
                t(np.zeros(3, np.int32)), t(np.zeros(len(q), np.int32)), out, lse, causal, 0, 1.0, 1e4, scale)

    for b, (n, qo) in enumerate(zip(kv_lens, qo_lens)):
        pages = pool[page_values[page_indptr[b]:page_indptr[b + 1]]]  # [p, 2, Hkv, PAGE, D]
        k = pages[:, 0].transpose(1, 0, 2, 3).reshape(KV_HEADS, -1, D)[:, :n]  # [Hkv, n, D]
        v = pages[:, 1].transpose(1, 0, 2, 3).reshape(KV_HEADS, -1, D)[:, :n]
        for r in range(qo):
            seen = min(n, n - qo + r + 1) if causal else n  # the query rows are the sequence's last ones
            for h in range(QO_HEADS):
                s = k[h // (QO_HEADS // KV_HEADS), :seen] @ q[q_indptr[b] + r, h] * scale
                w = np.exp(s - s.max())
                np.testing.assert_allclose(out.numpy()[q_indptr[b] + r, h],
                                           w @ v[h // (QO_HEADS // KV_HEADS), :seen] / w.sum(), rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(lse.numpy()[q_indptr[b] + r, h],
                                           (s.max() + np.log(w.sum())) / np.log(2), rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_matches_numpy():
    """One query row per sequence over its cached keys: full pages, a partial last page, an empty
    sequence (output 0)."""
    from ernie_compile.targets.cpu_attention import paged_decode_attention

    rng = np.random.default_rng(7)
    kv_lens = [37, 16, 1, 0, 50]
    npages = [-(-n // PAGE) for n in kv_lens]
    pool = rng.standard_normal((sum(npages) + 2, 2, KV_HEADS, PAGE, D)).astype(np.float32)
    page_values = rng.permutation(len(pool))[:sum(npages)].astype(np.int32)
    page_indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    last_page_len = np.array([n - (p - 1) * PAGE if p else 0 for n, p in zip(kv_lens, npages)], np.int32)
    q = rng.standard_normal((len(kv_lens), QO_HEADS, D)).astype(np.float32)
    scale = 1 / np.sqrt(D)

    lib = tvm.compile(tvm.IRModule({"main": paged_decode_attention(KV_HEADS, QO_HEADS, D, "float32", PAGE)
                                    .with_attr("global_symbol", "main")}), target=CpuTarget.from_spec(None).tvm)
    out = tvm.runtime.tensor(np.full_like(q, np.nan))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], np.float32))
    t = tvm.runtime.tensor
    zeros = t(np.zeros(len(kv_lens), np.int32))
    lib["main"](t(q), t(pool), t(page_indptr), t(page_values), t(last_page_len), zeros, zeros, out, lse,
                0, 1.0, 1e4, scale)

    for b, n in enumerate(kv_lens):
        pages = pool[page_values[page_indptr[b]:page_indptr[b + 1]]]
        k = pages[:, 0].transpose(1, 0, 2, 3).reshape(KV_HEADS, -1, D)[:, :n]
        v = pages[:, 1].transpose(1, 0, 2, 3).reshape(KV_HEADS, -1, D)[:, :n]
        for h in range(QO_HEADS):
            if n == 0:
                np.testing.assert_array_equal(out.numpy()[b, h], 0)
                continue
            s = k[h // (QO_HEADS // KV_HEADS)] @ q[b, h] * scale
            w = np.exp(s - s.max())
            np.testing.assert_allclose(out.numpy()[b, h], w @ v[h // (QO_HEADS // KV_HEADS)] / w.sum(),
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(lse.numpy()[b, h], (s.max() + np.log(w.sum())) / np.log(2), rtol=1e-5, atol=1e-5)
