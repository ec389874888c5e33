"""python -m shared.parallel: rank 1.. of a TP/PP group (started by its leader or torchrun)."""
import sys

from shared.parallel.launch import follower_main

sys.exit(follower_main())
