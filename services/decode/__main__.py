"""python -m services.decode: a model worker started in the decode role."""
from services.worker.cli import worker_command

worker_command("decode")()
