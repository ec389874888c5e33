"""Tensor- and pipeline-parallel worker groups (torch.distributed): shape.py (who holds
what), sharded.py (a rank's model, read from its slices), group.py (collectives and the
leader's commands), runner.py (steps across the group), launch.py (starting the ranks)."""
