"""An OpenAI-compatible HTTP server over the engine (``kimi-linear serve``) and a terminal chat (``kimi-linear chat``).

Modules: app.py (the FastAPI app: :func:`~kimi_linear.server.app.build_app`), completions.py and
chat_completions.py (the two generation endpoints), protocol.py (request models, errors, response pieces),
streams.py (engine requests tied to the HTTP request's life), metrics.py (Prometheus), context.py (what handlers
share), loading.py (model directory → engine), serve.py (uvicorn with a draining shutdown), terminal.py (the chat),
cli.py (the subcommands' arguments). This package imports nothing heavy until a command runs.
"""
