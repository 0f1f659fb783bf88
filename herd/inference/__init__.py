"""herd.inference: the generation engine (token ids in, token ids out) and the generate/chat commands.

- sampling.py  SamplingParams and the pure temperature / top-k / top-p / min-p / seeded-draw functions
- engine.py    Engine: static KV cache, batched prefill + decode, stop tokens, log-probs, streaming
- cli.py       `herd generate` and `herd chat` (tokenizing and the chat format happen there)
"""

from herd.inference.engine import Engine, GenerationResult, TokenEvent
from herd.inference.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "TokenEvent", "SamplingParams"]
