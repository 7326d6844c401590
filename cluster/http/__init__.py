"""The HTTP ingress.

api.py         the FastAPI ingress (/v1/completions, /v1/chat/completions, /v1/jobs, ...)
protocol.py    OpenAI-compatible request / response models and errors
frontend.py    tokenisation, validation and KV footprint of a request
guard.py       the ASGI middleware: API keys, body limits and timeouts
jobs.py        the job runner for long-context requests
jobs_store.py  the jobs' SQLite store
"""
