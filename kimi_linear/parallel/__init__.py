"""Tensor-parallel serving over the GPUs of one host (``kimi-linear serve --tensor-parallel N``).

tensor.py (what each rank holds, the all-reduces), loading.py (a rank's shard from a checkpoint), protocol.py and
group.py (what rank 0 tells the others each step, and over which process groups), engine.py (rank 0's engine and the
other ranks' loop), launch.py (the processes), serving.py (the ``serve`` command's engine).
"""
