"""longctx.attention: dense oracle, tiled (one device), context parallelism (ring, all-gather,
Ulysses, hybrid) and S²-Attn.

    from longctx.attention import context_parallel_attention, dense_attention
    out = context_parallel_attention(q, k, v, segment_ids, mesh=mesh, axis="seq", layout="zigzag",
                                     strategy="ring")

q: [B, L, Hq, D]; k, v: [B, L, Hkv, D] (Hq % Hkv == 0); segment_ids: [B, L] int32, 0 = padding.
A model's attention function comes from one typed `AttentionSpec` (spec.py):

    attend = AttentionSpec(strategy="all_gather", layout="zigzag").function(mesh)
    out = attend(q, k, v, segment_ids, positions)

See docs/DESIGN.md contract 3.
"""
from longctx.attention.all_gather import all_gather_attention
from longctx.attention.online_softmax import merge_partials
from longctx.attention.kernels.base import Kernel
from longctx.attention.local import tiled_attention, tiled_attention_with_lse

# The names before the renamings (docs/DESIGN.md, "Glossary"), kept for code that imports them.
blockwise_attention, blockwise_attention_with_lse = tiled_attention, tiled_attention_with_lse
from longctx.attention.layouts import (Layout, original_index, permute, permute_batch, unpermute,
                                       unpermute_batch)
from longctx.attention.reference import MaskSpec, dense_attention, dense_attention_with_lse
from longctx.attention.ring import ring_attention
from longctx.attention.shifted_sparse import (context_parallel_shifted_sparse_attention,
                                              s2_dense_attention, shifted_sparse_attention,
                                              shifted_sparse_ring_attention)
from longctx.attention.spec import AttentionFn, AttentionImpl, AttentionSpec, Tiles
from longctx.attention.strategies import Strategy, context_parallel_attention
from longctx.attention.ulysses import hybrid_attention, ulysses_attention

__all__ = [
    "AttentionFn", "AttentionImpl", "AttentionSpec", "Kernel", "Layout", "MaskSpec", "Strategy",
    "Tiles", "all_gather_attention", "tiled_attention",
    "tiled_attention_with_lse", "context_parallel_attention",
    "context_parallel_shifted_sparse_attention", "dense_attention", "dense_attention_with_lse",
    "hybrid_attention", "merge_partials", "original_index", "permute", "permute_batch",
    "ring_attention", "s2_dense_attention", "shifted_sparse_attention",
    "shifted_sparse_ring_attention", "ulysses_attention", "unpermute", "unpermute_batch",
]
