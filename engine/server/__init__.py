"""`engine serve`: an OpenAI-compatible HTTP server (the optional `server` extra: uvicorn + starlette).

protocol.py validates request bodies into jobs, app.py runs them on one model with one session per slot,
slots.py hands requests their slots (FIFO queue beyond them), turns.py makes the slots' generations take turns
on the model (one step at a time), metrics.py counts for /metrics, stops.py applies stop strings to streamed
text, command.py runs uvicorn (the click command is in engine/cli.py). Nothing here is imported until the server runs.
"""
