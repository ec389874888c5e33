"""python -m services.prefill: a model worker started in the prefill role."""
from services.worker.cli import worker_command

worker_command("prefill")()
