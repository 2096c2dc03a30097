"""``meminject serve``: an OpenAI-compatible HTTP server whose requests choose memories.

Why: applications and evaluation harnesses speak the OpenAI API, and no server lets a
request pick its interventions. Here a request names memories from the loaded set
(``"memories": ["nepal-capital", {"name": "tokyo", "tau": 2.0}]``, which the official
clients send with ``extra_body``), and concurrent requests with different sets run in
one batch (``generate_batch`` gives each row its own set).

* :mod:`meminject.serve.protocol`: the request bodies (pydantic, unknown fields refused)
  and OpenAI-style error bodies;
* :mod:`meminject.serve.batcher`: the queue that gathers concurrent requests into
  batches on one worker thread, streaming each row's tokens back to its request;
* :mod:`meminject.serve.app`: the Starlette application (routes, bearer-token auth,
  server-sent events) that uvicorn runs.
"""
