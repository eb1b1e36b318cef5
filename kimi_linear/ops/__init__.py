"""Compute ops: each has a pure-PyTorch implementation (CPU and reference) and, where it pays, a kernel."""
