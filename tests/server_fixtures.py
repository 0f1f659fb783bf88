"""Shared pieces of the server tests: tiny models, a byte-level Llama 3 tokenizer (256 byte tokens + the
256 Llama 3.1 special tokens: the same code path as the official tokenizer, a 512-row vocabulary), a
model trained in seconds on it to answer three dialogs (a greeting, a JSON object, a Llama 3.1 tool
call) so tool calls, JSON mode and the chat page can be checked end to end, and greedy references by
cache-free full forwards."""

from __future__ import annotations

import torch

from herd.model import ModelArgs, Transformer
from herd.tokenizer import ChatFormat, Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
    "name": "get_weather", "arguments": {"city": "Paris"}}}]}
JSON_Q = [{"role": "user", "content": "Reply with a JSON object."}]
JSON_A = '{"answer": 42, "unit": "none"}'
HELLO_Q = [{"role": "user", "content": "Hello"}]
HELLO_A = "Hi there! How can I help you today?"


def byte_tokenizer() -> Tokenizer:
    """Llama 3's tokenizer with no merges: every byte is a token (ids 0-255), specials at 256-511."""
    return Tokenizer({bytes([i]): i for i in range(256)}, name="bytes")


def trained_byte_model(seed: int = 0) -> tuple[Transformer, Tokenizer]:
    tok = byte_tokenizer()
    model = tiny_model(tok.n_words, seed=seed, max_seq_len=2048)
    loss = train_dialogs(model, tok)
    assert loss < 0.01, loss
    return model, tok


def tiny_model(vocab: int, seed: int = 0, max_seq_len: int = 512) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32,
                     max_seq_len=max_seq_len, tie_embeddings=True)
    model = Transformer(args)
    model.init_weights(std=0.1)
    return model.eval()


def train_dialogs(model: Transformer, tok: Tokenizer, steps: int = 400) -> float:
    """Overfit the model on the three dialogs (loss on the assistant replies only); returns the last loss."""
    chat = ChatFormat(tok)
    seqs = [chat.encode_dialog_with_mask(WEATHER_Q + [WEATHER_CALL], tools=TOOLS),
            chat.encode_dialog_with_mask(JSON_Q + [{"role": "assistant", "content": JSON_A}]),
            chat.encode_dialog_with_mask(HELLO_Q + [{"role": "assistant", "content": HELLO_A}])]
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = torch.tensor(0.0)
    for step in range(steps):
        total = torch.tensor(0.0)
        for ids, mask in seqs:
            x = torch.tensor([ids[:-1]])
            keep = torch.tensor(mask[1:])
            h = model.features(x)[0][keep]  # only the positions that predict the reply
            total = total + torch.nn.functional.cross_entropy(model.logits(h), torch.tensor(ids[1:])[keep])
        opt.zero_grad()
        total.backward()
        opt.step()
        loss = total.detach() / len(seqs)
        if loss < 2e-3:
            break
    model.eval()
    return float(loss)


def greedy_reference(model: Transformer, prompt: list[int], n: int, stops: set[int]) -> list[int]:
    """Greedy decoding by a full forward per token (no cache), stopping at a stop token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq]))[0, -1].argmax())
            if t in stops:
                break
            seq.append(t)
    return seq[len(prompt):]
