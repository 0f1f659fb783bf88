"""The Llama Guard 2 and 3 prompts, byte for byte, and the reply a guard is trained to give.

Both versions ask the same question in the same words (llama-recipes
`src/llama_cookbook/inference/prompt_format_utils.py`: PROMPT_TASK, SAFETY_CATEGORIES,
PROMPT_CONVERSATION, PROMPT_INSTRUCTIONS_2):

    Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy with the below categories.

    <BEGIN UNSAFE CONTENT CATEGORIES>
    S1: Violent Crimes.
    ...
    <END UNSAFE CONTENT CATEGORIES>

    <BEGIN CONVERSATION>

    User: ...

    Agent: ...

    <END CONVERSATION>

    Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:
     - First line must read 'safe' or 'unsafe'.
     - If unsafe, a second line must include a comma-separated list of violated categories.

They differ in the wrapping and in the category lines, as in the chat templates Meta ships with
the weights (tokenizer_config.json of meta-llama/Meta-Llama-Guard-2-8B and Llama-Guard-3-8B):

- Llama Guard 2: `<|begin_of_text|>[INST] {task} [/INST]`; category lines `S1: Violent Crimes. `
  (period and a space).
- Llama Guard 3: the Llama 3 chat format, the task as one user turn:
  `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{task}<|eot_id|>`
  `<|start_header_id|>assistant<|end_header_id|>\\n\\n`; category lines `S1: Violent Crimes.`.
  This is also what llama-stack's Llama Guard shield sends (its prompt as a user message of the
  Llama 3 chat format). llama-recipes' PROMPT_TEMPLATE_3 writes a space instead of the blank line
  after the user header and no blank line after the assistant header; the weights' template is
  what herd follows, for inference and for training data alike.

With descriptions (llama-recipes' `with_policy`), each category line is followed by a newline and
its description. Turns are `User: {text}` / `Agent: {text}` (the text stripped, as the templates
do), joined by a blank line. The guard answers `safe`, or `unsafe` and a second line of codes
(`unsafe\\nS1,S10`), then ends its turn.

Which messages the guard sees: user messages as `User`, assistant messages with text as `Agent`.
System and tool messages are left out (the guard judges what people and the model wrote; the
templates above accept only user and assistant turns). The role to check is the last turn's:
`User` classifies a prompt (no reply may follow it), `Agent` a reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from herd.errors import HerdError
from herd.safety.categories import Category, check_categories, default_categories
from herd.tokenizer import ChatFormat, Tokenizer

TASK = ("Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy "
        "with the below categories.")
CATEGORIES_BLOCK = "\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n"
CONVERSATION_BLOCK = "\n<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n"
INSTRUCTIONS = ("\nProvide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
                " - First line must read 'safe' or 'unsafe'.\n"
                " - If unsafe, a second line must include a comma-separated list of violated categories.")

GUARD_ROLES = ("User", "Agent")
"""`User`: classify the last user message (prompt classification); `Agent`: the last reply (response classification)."""

_SPEAKERS = {"user": "User", "assistant": "Agent"}
_SKIPPED = ("system", "developer", "tool", "ipython")


def guard_turns(conversation: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(User|Agent, stripped text) of the messages a guard sees; HerdError for malformed messages.

    System and tool messages are left out, and so are assistant messages without text (tool calls).
    """
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise HerdError("a conversation must be a list of {'role': ..., 'content': ...} messages.")
    turns = []
    for i, m in enumerate(conversation):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise HerdError(f"message {i} is not a {{'role': ..., 'content': ...}} object.")
        role, content = m["role"], m.get("content")
        if isinstance(content, list):  # OpenAI content parts
            if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise HerdError(f"message {i} has non-text content parts; the guard reads text only.")
            content = "".join(p["text"] for p in content)
        if role in _SKIPPED:
            continue
        if role not in _SPEAKERS:
            raise HerdError(f"message {i} has role '{role}'; the guard reads user and assistant messages "
                            "(system and tool messages are left out).")
        if content is None and role == "assistant":
            continue
        if not isinstance(content, str):
            raise HerdError(f"message {i} ({role}) has {type(content).__name__} content; give text.")
        turns.append((_SPEAKERS[role], content.strip()))
    return turns


@dataclass(frozen=True)
class GuardFormat:
    """How prompts are written for one guard: Llama Guard version, categories, descriptions or not."""

    version: int = 3
    """2: `[INST] ... [/INST]` with categories S1-S11; 3: the Llama 3 chat format with S1-S14."""
    categories: tuple[Category, ...] = field(default=())
    """The categories shown to the guard (empty: the version's published list)."""
    descriptions: bool = False
    """Write each category's description under its name (llama-recipes' with_policy)."""

    def __post_init__(self) -> None:
        defaults = default_categories(self.version)  # also the one-line error for an unknown version
        cats = self.categories or defaults
        object.__setattr__(self, "categories", check_categories(cats))

    @property
    def codes(self) -> list[str]:
        return [c.code for c in self.categories]

    def category_name(self, code: str) -> str:
        return next((c.name for c in self.categories if c.code == code), "unknown category")

    def category_lines(self) -> str:
        """The block between <BEGIN UNSAFE CONTENT CATEGORIES> and <END ...>."""
        suffix = ". " if self.version == 2 else "."
        lines = []
        for c in self.categories:
            name = c.name.rstrip().rstrip(".") + suffix  # a name given with its period keeps one
            lines.append(f"{c.code}: {name}" + (f"\n{c.description}" if self.descriptions and c.description else ""))
        return "\n".join(lines)

    def role_for(self, turns: list[tuple[str, str]], role: str | None = None) -> str:
        """The role to check (the last turn's unless given), or HerdError when the conversation cannot be checked."""
        if not any(speaker == "User" for speaker, _ in turns):
            raise HerdError("the conversation has no user message; the guard classifies a user prompt or an "
                            "assistant reply to one.")
        last = turns[-1][0]
        if role is None:
            return last
        if role not in GUARD_ROLES:
            raise HerdError(f"unknown guard role '{role}'; use User (classify the prompt) or Agent (the reply).")
        if role != last:
            raise HerdError(f"the conversation ends with a{'n' if last == 'Agent' else ''} {last} message, so "
                            f"the last {role} message cannot be checked; "
                            + ("drop the reply to classify the prompt." if role == "User" else
                               "add the assistant's reply to classify it."))
        return role

    def task(self, conversation: Sequence[Mapping[str, Any]], role: str | None = None) -> str:
        """The instruction text (the guard's user turn), without any special tokens."""
        turns = guard_turns(conversation)
        role = self.role_for(turns, role)
        text = "\n\n".join(f"{speaker}: {content}" for speaker, content in turns)
        return (TASK.format(role=role) + CATEGORIES_BLOCK.format(categories=self.category_lines())
                + CONVERSATION_BLOCK.format(conversation=text) + INSTRUCTIONS.format(role=role))

    def render(self, conversation: Sequence[Mapping[str, Any]], role: str | None = None) -> str:
        """The whole prompt as a string, special tokens written out (what a chat template renders)."""
        task = self.task(conversation, role)
        if self.version == 2:
            return f"<|begin_of_text|>[INST] {task} [/INST]"
        return (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")

    def encode(self, tokenizer: Tokenizer, conversation: Sequence[Mapping[str, Any]],
               role: str | None = None) -> list[int]:
        """Token ids of the prompt; the guard's reply follows. Text is encoded as text (a message that
        contains "<|eot_id|>" cannot end the guard's turn early)."""
        task = self.task(conversation, role)
        if self.version == 2:
            return [tokenizer.bos_id] + tokenizer.encode(f"[INST] {task} [/INST]")
        return ChatFormat(tokenizer, style="meta").encode_dialog_prompt([{"role": "user", "content": task}])

    def reply(self, unsafe: Sequence[str] = ()) -> str:
        """What the guard should answer: "safe", or "unsafe" and the codes ("unsafe\\nS1,S10")."""
        codes = list(dict.fromkeys(unsafe))
        unknown = [c for c in codes if c not in self.codes]
        if unknown:
            raise HerdError(f"label {', '.join(unknown)} is not among the guard's categories "
                            f"({', '.join(self.codes)}).")
        return "unsafe\n" + ",".join(codes) if codes else "safe"

    def sft_record(self, conversation: Sequence[Mapping[str, Any]], unsafe: Sequence[str] = (),
                   role: str | None = None) -> dict[str, Any]:
        """One training record in the format `herd sft` reads, rendering to exactly encode() + reply.

        Version 3: {"messages": [user: task, assistant: reply]} (train with --chat-style meta).
        Version 2: {"prompt": "[INST] ... [/INST]", "completion": reply} (train with --text-pairs text:
        `<|begin_of_text|>` prompt completion `<|end_of_text|>`).
        """
        task = self.task(conversation, role)
        reply = self.reply(unsafe)
        if self.version == 2:
            return {"prompt": f"[INST] {task} [/INST]", "completion": reply}
        return {"messages": [{"role": "user", "content": task}, {"role": "assistant", "content": reply}]}

    def sft_flags(self) -> str:
        """The `herd sft` flags that render sft_record() as the guard reads it."""
        return "--chat-style meta" if self.version == 3 else "--text-pairs text"
