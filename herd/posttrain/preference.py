"""One preference record -> a shared prompt and ranked responses as token ids, with the masks the losses need.

Record formats (TRL's preference formats, so data prepared for TRL's DPOTrainer and RewardTrainer
works unchanged, plus Llama 3's ranked form):

    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}     explicit prompt
    {"prompt": "text", "chosen": "text", "rejected": "text"}                 strings
    {"chosen": [full conversation], "rejected": [full conversation]}         implicit prompt: the
                                                                             messages both share
    {..., "edited": ...}          Llama 3's ranking edited > chosen > rejected (same shape as chosen)
    {..., "margin": 1.5}          TRL RewardTrainer's optional margin (Llama 2's margin term)

Strings become a user turn and an assistant reply (text_pairs="chat"), or raw text (text_pairs=
"text": `<|begin_of_text|>` prompt response `<|end_of_text|>`, TRL's non-conversational form). A
string prompt with message-list responses that hold the whole conversation is the implicit form
(TRL's maybe_extract_prompt: UltraFeedback-style data carries both).

Rendering follows TRL's DPOTrainer (trl/trainer/dpo_trainer.py, `tokenize_fn`): the prompt is
rendered with the generation prompt, each prompt + response without it, and the responses start
where all of them stop agreeing with the prompt's ids; so the prompt ids are shared by every
response of a record.

Masks of a response's tokens (the completion mask, TRL's, is every response token):
  formatting  Llama 3 §4.1.4 masks "special formatting tokens including header and termination
              tokens" out of both chosen and rejected in the DPO loss: each header
              `<|start_header_id|>role<|end_header_id|>` with the blank line the chat format puts
              after it, and every `<|eot_id|>` / `<|eom_id|>` / `<|end_of_text|>`. Found by token
              id: special-token strings inside message text are encoded as plain text, so only the
              chat format itself writes these ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from herd.errors import HerdError
from herd.posttrain.render import RecordError, parse_messages, parse_tools
from herd.tokenizer.chat import ChatFormat

RANKS = ("edited", "chosen", "rejected")
"""Response fields of a record, best first (Llama 3's ranking)."""


@dataclass
class Preference:
    """A record in one shape: a prompt and its responses, best first."""

    prompt: list[dict[str, Any]]
    """Prompt messages (empty for raw text)."""
    responses: list[list[dict[str, Any]]]
    """Each response's messages, best first."""
    names: list[str]
    """Field of each response: ["chosen", "rejected"] or ["edited", "chosen", "rejected"]."""
    tools: list[Any] | None = None
    """Custom tool schemas shown to the model."""
    text: tuple[str, list[str]] | None = None
    """(prompt, responses) as raw text without the chat format (text_pairs="text")."""
    margin: float | None = None
    """How much better chosen is than rejected (TRL's "margin" column), if the record says."""


@dataclass
class RenderedPreference:
    """Token ids of a preference record: the shared prompt and each response after it."""

    prompt: list[int]
    """Ids of the prompt, ending with the assistant header the responses answer."""
    responses: list[list[int]]
    """Ids of each response (prompt + response is the whole rendered conversation), best first."""
    formatting: list[list[bool]]
    """Per response token: True for a formatting token (header, end of turn) the Llama 3 mask removes."""
    names: list[str]
    """Field of each response (edited / chosen / rejected)."""
    margin: float | None = None


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _common_prefix(seqs: list[list[Any]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _text_prefix(texts: list[str]) -> int:
    """TRL's extract_prompt on strings: the common prefix, leaving a space that precedes the split to the responses."""
    n = _common_prefix([list(t) for t in texts])
    if 0 < n < min(len(t) for t in texts) and texts[0][n - 1] == " ":
        n -= 1
    return n


def to_preference(record: dict[str, Any], text_pairs: str = "chat", use_edited: bool = True) -> Preference:
    """The Preference a record describes, or RecordError (unknown_format, bad_messages, unknown_role, no_shared_prompt)."""
    if "chosen" not in record or "rejected" not in record:
        keys = ", ".join(sorted(map(str, record))[:6]) or "none"
        hint = ""
        if "messages" in record or "completion" in record:
            hint = "; it looks like SFT data (for herd sft)"
        raise RecordError("unknown_format", f"fields {keys}{hint}")
    names = [n for n in RANKS if record.get(n) is not None and (n != "edited" or use_edited)]
    if "chosen" not in names or "rejected" not in names:
        raise RecordError("bad_messages", "'chosen' or 'rejected' is null")
    values = [record[n] for n in names]
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise RecordError("bad_messages", f"'margin' is a {type(margin).__name__}, not a number")
    margin = None if margin is None else float(margin)
    tools = parse_tools(record)
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise RecordError("bad_messages", f"'prompt' is a {type(prompt).__name__}, not a string or a list of messages")
    for n, v in zip(names, values):
        if not isinstance(v, (str, list)):
            raise RecordError("bad_messages", f"'{n}' is a {type(v).__name__}, not a string or a list of messages")
    strings = all(isinstance(v, str) for v in values)
    if not strings and any(isinstance(v, str) for v in values):
        raise RecordError("bad_messages", "responses mix strings and message lists")

    # implicit prompt: no prompt, or a string prompt beside whole conversations (TRL's maybe_extract_prompt)
    implicit = prompt is None or (isinstance(prompt, str) and not strings
                                  and any(v and isinstance(v[0], dict) and v[0].get("role") != "assistant" for v in values))
    if strings:
        if implicit:
            n = _text_prefix(values)
            prompt, values = values[0][:n], [v[n:] for v in values]
        if not isinstance(prompt, str):  # message-list prompt, string responses: each is one assistant reply
            return Preference(parse_messages(prompt, "prompt"),
                              [[{"role": "assistant", "content": v}] for v in values], names, tools, margin=margin)
        if text_pairs == "text":
            return Preference([], [], names, None, (prompt, list(values)), margin)
        if implicit and not prompt.strip():
            raise RecordError("no_shared_prompt", "the responses share no prompt text")
        return Preference([{"role": "user", "content": prompt}],
                          [[{"role": "assistant", "content": v}] for v in values], names, tools, margin=margin)
    responses = [parse_messages(v, n) for n, v in zip(names, values)]
    if implicit:
        n = _common_prefix(responses)
        if n == 0:
            raise RecordError("no_shared_prompt", "the conversations do not start with the same messages")
        if all(len(r) == n for r in responses):  # identical conversations: nothing left to compare
            n -= 1
        return Preference(responses[0][:n], [r[n:] for r in responses], names, tools, margin=margin)
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        prompt_msgs = parse_messages(prompt, "prompt")
    if not prompt_msgs:
        raise RecordError("no_shared_prompt", "'prompt' is empty")
    return Preference(prompt_msgs, responses, names, tools, margin=margin)


def formatting_mask(ids: list[int], chat: ChatFormat) -> list[bool]:
    """True on the formatting tokens of rendered ids: headers (with the blank line after them) and end tokens."""
    tok = chat.tokenizer
    ends = {tok.eot_id, tok.eom_id, tok.eos_id}
    blank = tok.encode("\n\n")
    out = [False] * len(ids)
    i = 0
    while i < len(ids):
        t = ids[i]
        if t in ends:
            out[i] = True
        elif t == tok.start_header_id:
            j = i
            while j < len(ids) and ids[j] != tok.end_header_id:
                out[j] = True
                j += 1
            if j < len(ids):  # the closing <|end_header_id|> and the blank line the format writes after it
                out[j] = True
                if ids[j + 1:j + 1 + len(blank)] == blank:
                    for k in range(j + 1, j + 1 + len(blank)):
                        out[k] = True
                    j += len(blank)
            i = j
        i += 1
    return out


def render_preference(pref: Preference, chat: ChatFormat) -> RenderedPreference:
    """Shared prompt ids and each response's ids and formatting mask; RecordError when it cannot be rendered."""
    tok = chat.tokenizer
    if pref.text is not None:
        prompt_text, texts = pref.text
        prompt_ids = [tok.bos_id] + tok.encode(prompt_text)
        full = [[tok.bos_id] + tok.encode(prompt_text + t) + [tok.eos_id] for t in texts]
    else:
        try:
            prompt_ids = chat.encode_dialog_prompt(pref.prompt, add_generation_prompt=True, tools=pref.tools)
            full = [chat.encode_dialog_prompt(pref.prompt + r, add_generation_prompt=False, tools=pref.tools)
                    for r in pref.responses]
        except HerdError as e:  # wrong content types, malformed tool calls, tools without a user turn
            raise RecordError("bad_messages", str(e).rstrip(".")) from None
    # Where the prompt alone and every prompt + response stop agreeing (TRL: the tokenized prompt is
    # not always a prefix, e.g. when tokens merge across the boundary of raw text).
    n = _common_prefix([prompt_ids] + full)
    responses = [f[n:] for f in full]
    return RenderedPreference(prompt_ids[:n], responses, [formatting_mask(r, chat) for r in responses],
                              list(pref.names), pref.margin)
