"""Log-likelihood of continuations given contexts, batched, with every shared context computed once.

    loglikelihoods(model, [(context_ids, continuation_ids), ...]) -> [(log p(continuation | context), greedy?)]

This is what multiple-choice benchmarks, LAMBADA, perplexity windows and lm-eval's `loglikelihood`
need. The naive way (one forward over context + continuation per request, as lm-eval's Hugging Face
backend does) recomputes the context once per choice and, for few-shot prompts, the same few-shot
prefix once per request. Here the requests form a three-level tree and each node is computed once:

    shared prefix  (e.g. MMLU's 5-shot dev examples, the same for every question of a subject)
      -> context suffixes        (one row per distinct context, batched)
           -> continuations      (one row per choice, batched; only those longer than one token)

Each level runs the model over its new tokens only, attending to the KV cache of its parent level
(rows of the parent cache are copied to the children that extend them), so a context is computed
once for all its choices and a common prefix once for all its contexts. The first continuation token
is scored from the context's last position, so single-token choices (MMLU's " A".." D") cost no
forward of their own. Only the positions that are scored go through the output layer (for a 128K
vocabulary that layer is most of a small model's compute).

Masks and positions: a level writes its tokens into fresh cache slots after its parent's; row r may
read its parent row's valid slots and, causally, its own new tokens; RoPE positions continue from
the parent's length. Padding (right, per level) is never read by a real token. The result equals a
plain forward over context + continuation[:-1] (tests/test_eval_scorer.py checks it against one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from herd.errors import HerdError
from herd.model import KVCache, Transformer

Request = tuple[Sequence[int], Sequence[int]]


@dataclass
class ScorerConfig:
    """How the scorer batches its forwards."""

    batch_size: int = 64
    """Most rows (contexts or continuations) in one forward."""
    max_batch_tokens: int = 8192
    """Most tokens (rows x padded length) in one forward."""
    max_batch_mb: int = 2048
    """Memory budget of one forward's KV cache copy and attention scores, in MiB."""
    min_shared_prefix: int = 32
    """Contexts sharing a prefix of at least this many tokens compute that prefix once."""


class _Cache(KVCache):
    """KV buffers of one tree level (a KVCache over buffers built here, so the model's `cache.update`
    writes and reads them), plus which slots each row may attend to and where its positions continue."""

    def __init__(self, k: list[Tensor], v: list[Tensor], valid: Tensor, next_pos: Tensor):
        self.k, self.v = k, v  # per layer [R, n_kv_heads, T, head_dim]
        self.batch_size, self.max_len = k[0].shape[0], k[0].shape[2]
        self.valid = valid  # bool [R, T]: slots row r attends to from here on
        self.next_pos = next_pos  # long [R]: RoPE position of row r's next token


def _extend(model: Transformer, parent: _Cache | None, parent_rows: Tensor | None,
            tokens: list[Sequence[int]]) -> tuple[_Cache, Tensor]:
    """Run `tokens` (one list per row, right-padded here) on top of `parent`'s rows; returns the new
    level's cache and the hidden states [R, M, dim]."""
    args = model.args
    weight = model.tok_embeddings.weight
    dev, dtype = weight.device, weight.dtype
    rows, width = len(tokens), max(len(t) for t in tokens)
    lens = torch.tensor([len(t) for t in tokens], device=dev)
    t0 = parent.valid.shape[1] if parent is not None else 0
    total = t0 + width
    shape = (rows, args.n_kv_heads, total, args.head_dim)
    k = [torch.empty(shape, device=dev, dtype=dtype) for _ in range(args.n_layers)]
    v = [torch.empty(shape, device=dev, dtype=dtype) for _ in range(args.n_layers)]
    valid = torch.zeros(rows, total, dtype=torch.bool, device=dev)
    if parent is not None:
        for layer in range(args.n_layers):
            k[layer][:, :, :t0].copy_(parent.k[layer].index_select(0, parent_rows))
            v[layer][:, :, :t0].copy_(parent.v[layer].index_select(0, parent_rows))
        valid[:, :t0] = parent.valid.index_select(0, parent_rows)
        start = parent.next_pos.index_select(0, parent_rows)
    else:
        start = torch.zeros(rows, dtype=torch.long, device=dev)
    cols = torch.arange(width, device=dev)
    valid[:, t0:] = cols.unsqueeze(0) < lens.unsqueeze(1)
    ids = torch.zeros(rows, width, dtype=torch.long, device=dev)  # pad id 0: never read by a real token
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = torch.as_tensor(list(t), dtype=torch.long, device=dev)
    mask = torch.empty(rows, 1, width, total, dtype=torch.bool, device=dev)
    mask[:, 0, :, :t0] = valid[:, None, :t0]  # the parent's valid slots, for every query
    mask[:, 0, :, t0:] = torch.ones(width, width, dtype=torch.bool, device=dev).tril()  # causal among new
    positions = start.unsqueeze(1) + cols.unsqueeze(0)  # [R, M]
    cache = _Cache(k, v, valid, start + lens)
    h = model.features(ids, positions=positions, mask=mask, cache=cache,
                       cache_pos=torch.arange(t0, total, device=dev))
    return cache, h


def _score_positions(model: Transformer, h: Tensor, targets: Tensor, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """log p(target) and whether target is the argmax, for hidden states h [N, dim] and targets [N]."""
    logps, greedy = [], []
    for s in range(0, h.shape[0], chunk):
        logits = model.logits(h[s:s + chunk])  # float32 [n, V]
        lp = torch.log_softmax(logits, dim=-1)
        tgt = targets[s:s + chunk]
        logps.append(lp.gather(1, tgt.unsqueeze(1)).squeeze(1))
        greedy.append(logits.argmax(dim=-1) == tgt)
    return torch.cat(logps), torch.cat(greedy)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prefix_groups(contexts: list[tuple[int, ...]], min_shared: int) -> list[tuple[int, list[int]]]:
    """Split context indices into (shared prefix length, members) groups. Contexts sorted by their
    tokens sit next to their neighbours with the longest common prefix; a run of them sharing at
    least `min_shared` tokens (and at least half of what the run started with, so two groups that
    share a little do not merge) is a group. The rest go into one group with prefix 0. Every member
    keeps at least one token of its own (its last position scores the first continuation token)."""
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])
    groups: list[tuple[int, list[int]]] = []
    pool: list[int] = []

    def close(run: list[int], shared: int) -> None:
        shared = min(shared, min(len(contexts[i]) for i in run) - 1)
        if len(run) >= 2 and shared >= min_shared:
            groups.append((shared, run))
        else:
            pool.extend(run)

    run, shared = [], 0
    for i in order:
        if run:
            common = min(shared, _lcp(contexts[run[-1]], contexts[i]))
            if common >= max(min_shared, shared // 2):
                run.append(i)
                shared = common
                continue
            close(run, shared)
        run, shared = [i], len(contexts[i])
    if run:
        close(run, shared)
    if pool:
        groups.append((0, pool))
    return groups


def _kv_bytes_per_slot(model: Transformer) -> int:
    a = model.args
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * model.tok_embeddings.weight.element_size()


def _row_batches(lengths: list[int], base_slots: int, cfg: ScorerConfig, model: Transformer) -> list[list[int]]:
    """Consecutive index runs (lengths sorted descending) whose forward fits the budgets."""
    budget = cfg.max_batch_mb * 2**20
    per_slot = _kv_bytes_per_slot(model)
    heads = model.args.n_heads
    out: list[list[int]] = []
    i = 0
    while i < len(lengths):
        width = lengths[i]  # the longest row of this batch (sorted)
        slots = base_slots + width
        per_row = slots * per_slot + heads * width * slots * 4 + width * slots
        rows = max(1, min(cfg.batch_size, cfg.max_batch_tokens // max(width, 1), budget // max(per_row, 1)))
        out.append(list(range(i, min(i + rows, len(lengths)))))
        i += rows
    return out


@torch.inference_mode()
def loglikelihoods(model: Transformer, requests: Sequence[Request], cfg: ScorerConfig | None = None,
                   max_length: int | None = None,
                   progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation token | everything before), every token greedy?) per request.

    requests: (context ids, continuation ids); both non-empty; the model reads context +
        continuation[:-1], which must fit `max_length` (default the model's max_seq_len).
    progress: called with the number of requests finished after each batch.
    """
    cfg = cfg or ScorerConfig()
    max_length = max_length or model.args.max_seq_len
    vocab = model.args.vocab_size
    for n, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0 or len(cont) == 0:
            raise HerdError(f"request {n} has an empty {'context' if len(ctx) == 0 else 'continuation'}; a context "
                            "needs at least one token (e.g. begin_of_text) and a continuation at least one token.")
        if len(ctx) + len(cont) - 1 > max_length:
            raise HerdError(f"request {n} needs {len(ctx) + len(cont) - 1} tokens, more than the context of "
                            f"{max_length}; drop or shorten it before scoring.")
        if min(min(ctx), min(cont)) < 0 or max(max(ctx), max(cont)) >= vocab:
            raise HerdError(f"request {n} holds a token id outside the model's vocabulary (0..{vocab - 1}); "
                            "use the tokenizer the model was trained with.")
    dev = model.tok_embeddings.weight.device
    model.eval()

    # distinct contexts, and the continuations hanging off each
    index: dict[tuple[int, ...], int] = {}
    contexts: list[tuple[int, ...]] = []
    children: list[list[int]] = []
    for r, (ctx, _) in enumerate(requests):
        key = tuple(int(t) for t in ctx)
        if key not in index:
            index[key] = len(contexts)
            contexts.append(key)
            children.append([])
        children[index[key]].append(r)
    conts = [tuple(int(t) for t in cont) for _, cont in requests]

    logprob = [0.0] * len(requests)
    greedy = [True] * len(requests)
    for shared, members in _prefix_groups(contexts, cfg.min_shared_prefix):
        prefix = None
        if shared > 0:
            prefix, _ = _extend(model, None, None, [contexts[members[0]][:shared]])
        members = sorted(members, key=lambda i: -(len(contexts[i]) - shared))
        suffix_lens = [len(contexts[i]) - shared for i in members]
        for batch in _row_batches(suffix_lens, shared, cfg, model):
            ctx_ids = [members[j] for j in batch]
            parent_rows = torch.zeros(len(ctx_ids), dtype=torch.long, device=dev) if prefix is not None else None
            level, h = _extend(model, prefix, parent_rows, [contexts[c][shared:] for c in ctx_ids])
            last = torch.tensor([len(contexts[c]) - shared - 1 for c in ctx_ids], device=dev)
            h_last = h[torch.arange(len(ctx_ids), device=dev), last]  # [R, dim]
            logits = model.logits(h_last)  # float32 [R, V]
            lp0 = torch.log_softmax(logits, dim=-1)
            top0 = logits.argmax(dim=-1).tolist()
            first = [(row, r) for row, c in enumerate(ctx_ids) for r in children[c]]
            rows_t = torch.tensor([row for row, _ in first], device=dev)
            toks_t = torch.tensor([conts[r][0] for _, r in first], device=dev)
            for (row, r), value in zip(first, lp0[rows_t, toks_t].tolist()):
                logprob[r] = value
                greedy[r] = top0[row] == conts[r][0]
            del lp0, logits

            # continuations longer than one token: feed continuation[:-1] on top of the context rows
            longer = sorted(((row, r) for row, r in first if len(conts[r]) > 1), key=lambda x: -len(conts[x[1]]))
            lens = [len(conts[r]) - 1 for _, r in longer]
            for sub in _row_batches(lens, level.valid.shape[1], cfg, model):
                pairs = [longer[j] for j in sub]
                parents = torch.tensor([row for row, _ in pairs], device=dev)
                _, hc = _extend(model, level, parents, [conts[r][:-1] for _, r in pairs])
                sel_rows = torch.tensor([k for k, (_, r) in enumerate(pairs) for _ in range(len(conts[r]) - 1)],
                                        device=dev)
                sel_cols = torch.tensor([j for _, r in pairs for j in range(len(conts[r]) - 1)], device=dev)
                targets = torch.tensor([t for _, r in pairs for t in conts[r][1:]], device=dev)
                lps, hits = _score_positions(model, hc[sel_rows, sel_cols], targets)
                lps, hits = lps.tolist(), hits.tolist()
                pos = 0
                for _, r in pairs:
                    n = len(conts[r]) - 1
                    logprob[r] += sum(lps[pos:pos + n])
                    greedy[r] = greedy[r] and all(hits[pos:pos + n])
                    pos += n
            if progress is not None:
                progress(len(first))
    return list(zip(logprob, greedy))


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[Request]:
    """Disjoint scoring windows covering every token of a document once, each with as much context as
    fits (lm-eval's loglikelihood_rolling): the first window is [prefix] + tokens[:L-1] predicting
    tokens[:L]; each next one predicts the next L tokens from the token before them; the last one
    is left-extended to a full window so its few new tokens get maximal context."""
    tokens = list(tokens)
    out: list[Request] = []
    if not tokens:
        return out
    first = min(max_length, len(tokens))
    out.append(([prefix_token], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        window = tokens[max(0, end - max_length - 1):end - 1]  # the inputs of a full window ending at `end`
        context = window[:len(window) - (n - 1)]
        out.append((context, tokens[done:end]))
        done = end
    return out
