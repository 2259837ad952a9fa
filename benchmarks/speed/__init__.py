"""Speed benchmark: TDLRT against LoRA per training step, side by side in one process (``python -m benchmarks.speed``).

* ``training.py``: full training steps (forward, backward, integrator, optimizer) of a DeBERTa-v3-base-shaped
  classifier (72 adapters) and of a VGG16-shaped conv net, LoRA and TDLRT interleaved step by step.
* ``scaling.py``: the integrator step alone against the number of adapters and the rank (batched and per-adapter).
* ``measure.py``: clocks (device-synchronised) and peak memory (allocator peak on CPU via the profiler, CUDA stats).
* ``models.py``: the models (from configs, random weights, offline) and the two methods.
"""
