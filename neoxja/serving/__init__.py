"""Serving: a continuous-batching engine (engine.py), its asyncio wrapper (async_engine.py) and an
OpenAI-compatible server (server.py, `neoxja serve`). Needs the `serve` extra for the server."""
