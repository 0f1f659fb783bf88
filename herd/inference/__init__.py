"""herd.inference: the generation engine (token ids in, token ids out), the server and the generate/chat commands.

- sampling.py   SamplingParams and the pure temperature / top-k / top-p / min-p / penalty / seeded-draw
                functions, and constrained choice (TokenConstraint)
- kv_pool.py    the paged KV cache: block pool, block tables, chained-hash prefix cache
- scheduler.py  continuous batching: waiting queue, running batch, chunked prefill, preemption
- engine.py     Engine: the model forwards of each step, sampling, stop tokens, log-probs, streaming
- json_mode.py  the JSON prefix automaton and the constraint behind response_format json_object
- cli.py        `herd generate` and `herd chat` (tokenizing and the chat format happen there)
- server/       `herd serve`: the OpenAI-compatible HTTP server and its chat page
"""

from herd.inference.engine import Engine, GenerationResult, TokenEvent
from herd.inference.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "TokenEvent", "SamplingParams"]
