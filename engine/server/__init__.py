"""`engine serve`: an OpenAI-compatible HTTP server (the optional `server` extra: uvicorn + starlette).

protocol.py validates request bodies into jobs, app.py runs them on one model and one session (a FIFO lock:
one sequence at a time), metrics.py counts for /metrics, stops.py applies stop strings to streamed text,
command.py is the click command. Only command.py is imported by the CLI; it imports the rest when run.
"""
