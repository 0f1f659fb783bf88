"""Reward models: a Llama 3 transformer with a scalar head on the last token, saved as transformers'
LlamaForSequenceClassification, and scoring conversations with one.

    rm = reward_model_from_checkpoint("ckpt/sft")              # body from any herd-loadable checkpoint
    rewards = rm(tokens, last=flat_last_indices)                  # float32 [n]
    save_reward_model(rm, "ckpt/rm", tokenizer_path="tokenizer.model")
    scorer = load_reward_scorer("ckpt/rm")                        # herd score / herd compare's judge
    scorer.score_conversations([[{"role": "user", ...}, {"role": "assistant", ...}]])

The model (Llama 2 §3.2.2, kept by Llama 3 §4.1.2) is the chat model with "the classification head
for next-token prediction replaced with a regression head for outputting a scalar reward": herd's
Transformer without its vocabulary-sized output layer (never built: a reward model of an 8B body
saves the 0.5B-parameter output matrix) plus `score` [1, dim], read from the final normed hidden
state of each sequence's last token.

On disk it is what transformers writes for LlamaForSequenceClassification with num_labels 1
(transformers/modeling_layers.py, GenericForSequenceClassification): config.json with that
architecture, one label and a pad_token_id, the body in LlamaModel's names ("model.layers.0..."),
and `score.weight` [1, hidden]. transformers reads the reward at the rightmost token that is not
the pad id; herd writes the tokenizer's `<|finetune_right_pad_id|>` (which the chat format never
emits) so both read the same token, the conversation's closing `<|eot_id|>`. herd also records
the chat style the model scores in (config.json "herd_reward"), and copies the tokenizer beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from herd.checkpoint.common import (atomic_folder, copy_tokenizer, read_json, read_safetensors_folder,
                                    write_safetensors_shards)
from herd.checkpoint.hf import args_from_config, from_hf_state_dict, hf_config, to_hf_state_dict
from herd.errors import HerdError
from herd.model import ModelArgs, Transformer
from herd.tokenizer.chat import DEFAULT_DATE, ChatFormat

ARCHITECTURE = "LlamaForSequenceClassification"
OFFICIAL_PAD_ID = 128004
"""<|finetune_right_pad_id|> of the official Llama 3.1 tokenizer."""


@dataclass
class RewardConfig:
    """How a reward model reads conversations (stored in its config.json)."""

    chat_style: str = "hf"
    """Chat format the conversations are rendered in (the one it was trained on)."""
    date_string: str = DEFAULT_DATE
    """'Today Date' of the hf chat style's system header."""
    pad_id: int | None = None
    """Token id transformers treats as padding when it looks for the last token."""


class RewardModel(Transformer):
    """A Llama 3 transformer with a scalar reward head instead of the vocabulary head.

    forward(tokens, last=...) -> rewards float32 [n]: the score of the final hidden state at the
    flat positions `last` (row * seq_len + position), by default each row's last position.
    Parameter names are the Transformer's (so LoRA, the parallel plans and herd's formats apply)
    plus score.weight [1, dim].
    """

    def __init__(self, args: ModelArgs, config: RewardConfig | None = None):
        # Built as tied so the [vocab, dim] output layer is never allocated; args keeps the
        # checkpoint's own tie setting for saving.
        super().__init__(dataclasses.replace(args, tie_embeddings=True))
        self.args = args
        self.score = nn.Linear(args.dim, 1, bias=False)
        self.reward_config = config or RewardConfig()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        body = dataclasses.replace(self.args, tie_embeddings=True).num_params(exclude_embeddings)
        return body + self.args.dim

    def forward(self, tokens: Tensor, *, last: Tensor | None = None, positions: Tensor | None = None,
                mask: Tensor | Any | None = None, document_ids: Tensor | None = None) -> Tensor:  # type: ignore[override]
        h = self.features(tokens, positions=positions, mask=mask, document_ids=document_ids)  # [B, S, D]
        bsz, seqlen, dim = h.shape
        if last is None:
            last = torch.arange(bsz, device=h.device) * seqlen + seqlen - 1
        rows = h.reshape(-1, dim).index_select(0, last)  # [n, D]
        return self.score(rows).squeeze(-1).float()

    def output_weight(self) -> Tensor:
        raise HerdError("a reward model has no vocabulary head; it scores sequences (call it with last=...).")

    def logits(self, h: Tensor) -> Tensor:
        raise HerdError("a reward model has no vocabulary head; it scores sequences (call it with last=...).")

    @classmethod
    def from_transformer(cls, model: Transformer, seed: int = 0, std: float = 0.02,
                         config: RewardConfig | None = None) -> "RewardModel":
        """A reward model sharing `model`'s body tensors (no copy), with a new head ~ Normal(0, std)
        (transformers' initializer_range). The vocabulary head of `model` is left out."""
        with torch.device("meta"):
            rm = cls(model.args, config)
        ref = model.tok_embeddings.weight
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("output.")}
        g = torch.Generator(device="cpu").manual_seed(seed)
        head = torch.randn(1, model.args.dim, generator=g) * std
        state["score.weight"] = head.to(device=ref.device, dtype=ref.dtype)
        rm.load_state_dict(state, assign=True, strict=True)
        rm.reset_buffers()
        return rm.train(model.training)


def is_reward_model(path: str | os.PathLike) -> bool:
    """Whether `path` holds a sequence-classification checkpoint (config.json naming such an architecture)."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    if not (folder / "config.json").is_file():
        return False
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and any(str(a).endswith("ForSequenceClassification") for a in cfg.get("architectures") or [])


def reward_model_from_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu",
                                 dtype: torch.dtype | None = None, seed: int = 0) -> RewardModel:
    """A reward model from a reward-model folder (loaded as is) or from any checkpoint herd loads
    (herd / hf / meta: the body, with a new head)."""
    if is_reward_model(path):
        return load_reward_model(path, device, dtype)
    from herd.checkpoint import load_checkpoint

    return RewardModel.from_transformer(load_checkpoint(path, device=device, dtype=dtype), seed=seed)


def _pad_id(args: ModelArgs, tokenizer_path: str | os.PathLike | None, pad_id: int | None) -> int:
    if pad_id is not None:
        return int(pad_id)
    if tokenizer_path is not None:
        from herd.tokenizer import Tokenizer

        return Tokenizer.from_file(tokenizer_path).pad_id
    if args.vocab_size >= 128256:
        return OFFICIAL_PAD_ID
    raise HerdError("saving a reward model needs its pad token id (transformers reads the reward at the last "
                    "non-pad token); pass tokenizer_path or pad_id.")


def save_reward_model(model: RewardModel, path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                      pad_id: int | None = None, shards: int = 1, overwrite: bool = False) -> Path:
    """Write `model` as a transformers LlamaForSequenceClassification folder (atomically); returns the folder.

    pad_id defaults to the tokenizer's <|finetune_right_pad_id|>.
    """
    if any(p.device.type == "meta" for p in model.parameters()):
        raise HerdError("the reward model is on the meta device (no weights); load or initialize it before saving.")
    args = model.args
    pad = _pad_id(args, tokenizer_path, pad_id if pad_id is not None else model.reward_config.pad_id)
    body = {k: v for k, v in model.state_dict().items() if k != "score.weight"}
    tensors = to_hf_state_dict(body, args)
    tensors["score.weight"] = model.score.weight.detach()
    dtype = model.tok_embeddings.weight.dtype
    cfg = hf_config(args, dtype)
    cfg.update(architectures=[ARCHITECTURE], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad,
               herd_reward={"chat_style": model.reward_config.chat_style,
                            "date_string": model.reward_config.date_string})
    path = Path(path)
    with atomic_folder(path, overwrite=overwrite) as tmp:
        with torch.no_grad():
            write_safetensors_shards(tmp, tensors, shards, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        copy_tokenizer(tokenizer_path, tmp)
    model.reward_config.pad_id = pad
    return path


def load_reward_model(path: str | os.PathLike, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> RewardModel:
    """A reward model from a LlamaForSequenceClassification folder (herd's or transformers'), in eval mode."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    if not is_reward_model(folder):
        raise HerdError(f"{folder} is not a reward model (no config.json with a ...ForSequenceClassification "
                        "architecture); pass the folder `herd reward` or transformers' save_pretrained wrote.")
    cfg = read_json(folder / "config.json")
    labels = len(cfg["id2label"]) if isinstance(cfg.get("id2label"), dict) else int(cfg.get("num_labels", 2))
    if labels != 1:
        raise HerdError(f"{folder} is a classifier with {labels} labels; a reward model has exactly one output "
                        "(num_labels 1).")
    args = args_from_config(cfg, source=str(folder / "config.json"))
    state = read_safetensors_folder(folder)
    score = state.pop("score.weight", None)
    if score is None or tuple(score.shape) != (1, args.dim):
        raise HerdError(f"{folder} has no score.weight of shape [1, {args.dim}]; it is not a Llama reward model.")
    state.pop("lm_head.weight", None)
    state = from_hf_state_dict(state, args)
    state["score.weight"] = score
    extra = cfg.get("herd_reward") if isinstance(cfg.get("herd_reward"), dict) else {}
    config = RewardConfig(chat_style=str(extra.get("chat_style", "hf")),
                          date_string=str(extra.get("date_string", DEFAULT_DATE)), pad_id=cfg.get("pad_token_id"))
    with torch.device("meta"):
        model = RewardModel(args, config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise HerdError(f"{folder} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        "use the folder a reward model was saved to.")
    loaded = {}
    for k, ref in expected.items():
        t = state.pop(k)
        if tuple(t.shape) != tuple(ref.shape):
            raise HerdError(f"tensor '{k}' in {folder} has shape {list(t.shape)} but the config expects "
                            f"{list(ref.shape)}; use the folder a reward model was saved to.")
        loaded[k] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(loaded, assign=True, strict=True)
    model.reset_buffers()
    return model.eval()


@torch.no_grad()
def score_sequences(model: RewardModel, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                    pad_id: int = 0) -> list[float]:
    """The reward of each token sequence, batched longest first (right padding: causal attention keeps
    each sequence's last token blind to it)."""
    device = model.tok_embeddings.weight.device
    out = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = len(sequences[idx[0]])
        tokens = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for b, i in enumerate(idx):
            tokens[b, :len(sequences[i])] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
        last = torch.tensor([b * width + len(sequences[i]) - 1 for b, i in enumerate(idx)])
        rewards = model(tokens.to(device), last=last.to(device)).tolist()
        for i, r in zip(idx, rewards):
            out[i] = float(r)
    return out


class RewardScorer:
    """Scores conversations with a reward model in its chat format.

    A RewardScorer is also `score(prompts, replies)`: the reward function herd compare's
    RewardModelJudge takes (each prompt a user message, each reply the assistant's answer).
    """

    def __init__(self, model: RewardModel, tokenizer: Any, batch_size: int = 16, max_seq_len: int | None = None,
                 chat_style: str | None = None, date_string: str | None = None) -> None:
        cfg = model.reward_config
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.chat = ChatFormat(tokenizer, style=chat_style or cfg.chat_style, date_string=date_string or cfg.date_string)
        self.max_seq_len = max_seq_len or model.args.max_seq_len
        self.pad_id = cfg.pad_id if cfg.pad_id is not None else tokenizer.pad_id

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None) -> list[int]:
        """Token ids of a whole conversation (no generation prompt): what the reward is read at the end of."""
        return self.chat.encode_dialog_prompt(messages, add_generation_prompt=False, tools=tools)

    def score_ids(self, sequences: Sequence[Sequence[int]]) -> list[float | None]:
        """Rewards of token sequences; None for an empty one or one longer than max_seq_len.

        Each distinct sequence is scored once, so equal sequences get exactly equal rewards (in
        different batch rows the float sums could differ in the last bits).
        """
        unique: dict[tuple[int, ...], int] = {}
        for s in sequences:
            if 0 < len(s) <= self.max_seq_len:
                unique.setdefault(tuple(s), len(unique))
        scores = score_sequences(self.model, list(unique), self.batch_size, self.pad_id)
        return [scores[unique[tuple(s)]] if tuple(s) in unique else None for s in sequences]

    def score_conversations(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[float | None]:
        """Rewards of conversations (lists of messages); None for one too long for the model."""
        return self.score_ids([self.encode(c) for c in conversations])

    def __call__(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float | None]:
        if len(prompts) != len(replies):
            raise HerdError(f"{len(prompts)} prompts but {len(replies)} replies; score one reply per prompt.")
        return self.score_conversations([[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                                         for p, r in zip(prompts, replies)])


def load_reward_scorer(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                       dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                       batch_size: int = 16) -> RewardScorer:
    """A RewardScorer for the reward model at `path` with its own tokenizer; `tokenizer` (e.g. the policy's)
    must be the same file content, else HerdError: the reward would be read from ids the model never learned."""
    from herd.checkpoint.common import parse_dtype
    from herd.posttrain.dataset import load_tokenizer_for

    model = load_reward_model(path, device=device, dtype=parse_dtype(dtype))
    tok = load_tokenizer_for(path, tokenizer, model.args.vocab_size)
    return RewardScorer(model, tok, batch_size=batch_size)
