"""python -m services.worker: a model worker (prefill, decode or both)."""
from services.worker.cli import main

main()
