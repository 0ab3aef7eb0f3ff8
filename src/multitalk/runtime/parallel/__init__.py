"""Several processes (GPUs) for one video: sequence-parallel (Ulysses) and guidance-parallel DiT.

* :mod:`.group`: start / join the processes, control plane, failure watchdog, timeouts;
* :mod:`.plan`: which process runs which guidance branch, and the Ulysses degree;
* :mod:`.sequence`: the Ulysses layouts on diffusers' context-parallel engine and MultiTalk's
  token shard (audio attention per frame, speaker routing);
* :mod:`.channel`: tensors from rank 0 to the others, branch predictions back.

The pipeline's orchestration (rank 0's sampler, the servants' loop) is ``multitalk.pipeline.parallel``.
"""
