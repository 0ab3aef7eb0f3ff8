"""multitalk: MeiGen-MultiTalk that just works.

Layers (each imports only the layers to its left):
media -> models -> runtime -> pipeline -> service / cli / ui
"""

import os

__version__ = "0.1.0"

# Block streaming and the 24 GB / 12 GB memory tiers allocate and free large,
# differently sized buffers every step; with PyTorch's default caching allocator
# a 24 GiB cap ran out of memory with 4.4 GiB reserved but unallocated
# (benchmarks/results/2026-12-02_nvidia-h200_memory-run1.json) and passed with
# expandable segments (..._memory-run2-expandable.json). The allocator reads the
# variable at the first CUDA allocation, so setting it on import is in time for
# every entry point; a value the user set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
