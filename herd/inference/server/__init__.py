"""herd.inference.server: the OpenAI-compatible HTTP server (`herd serve`), a thin shell over the Engine.

- protocol.py  request fields checked into herd's types, OpenAI error and response shapes, SSE
- worker.py    the engine's thread and the asyncio bridge (jobs, cancellation, metrics counters)
- generate.py  chat and text completions: stop strings, streaming, log-probs, echo, tools, JSON mode
- app.py       the FastAPI routes, limits, API key, /metrics, the chat page
- runner.py    ServerConfig (the flags), build_app(), and ServerThread (a server in a thread, for tests)
- cli.py       `herd serve`
- static/      the chat page (one self-contained HTML file)
"""
