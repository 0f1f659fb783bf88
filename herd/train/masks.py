"""Document masking for packed sequences: what to pass to the model so attention stays inside a document.

Three cases, cheapest first:
- every row holds one document (or masking is off): nothing; the model takes SDPA's is_causal
  fast path with positions 0..S-1 (a window that starts mid-document also restarts at 0 there);
- CUDA with --compile: a FlexAttention BlockMask (document-causal, computed blockwise so fully
  masked 128x128 tiles are skipped; the compiled blocks fuse it into one kernel) plus positions
  restarting per document;
- otherwise (CPU, or CUDA eager): the document ids themselves; the model builds a boolean
  [B, 1, S, S] same-document causal mask for SDPA and restarts the positions.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from herd.model import document_positions

from torch.nn.attention.flex_attention import create_block_mask


def single_document_rows(document_ids: Tensor) -> bool:
    """True when no row of document_ids [B, S] changes document (plain causal attention is exact)."""
    return bool((document_ids[:, 1:] == document_ids[:, :-1]).all())


def flex_document_mask(document_ids: Tensor) -> Any:
    """A FlexAttention BlockMask for document-causal attention over document_ids [B, S] (on their device)."""
    bsz, seqlen = document_ids.shape

    def doc_causal(b, h, q, kv):
        return (q >= kv) & (document_ids[b, q] == document_ids[b, kv])

    return create_block_mask(doc_causal, B=bsz, H=None, Q_LEN=seqlen, KV_LEN=seqlen,
                             device=document_ids.device)


def attention_kwargs(document_ids: Tensor, *, enabled: bool = True, use_flex: bool | None = None) -> dict[str, Any]:
    """Keyword arguments for model.features / forward that implement document masking.

    document_ids: int64 [B, S] on the model's device. use_flex: default = on CUDA when available.
    """
    if not enabled or single_document_rows(document_ids):
        return {}
    if use_flex is None:
        use_flex = document_ids.is_cuda
    if use_flex:
        return {"mask": flex_document_mask(document_ids), "positions": document_positions(document_ids)}
    return {"document_ids": document_ids}

