"""Benchmark of context-parallel attention (the library behind ``scripts/bench_attention.py``).

One module per job:

* :mod:`.config` - what a run measures (:class:`~.config.BenchConfig`) and the dtype names.
* :mod:`.variants` - the implementations under test and how each runs a forward.
* :mod:`.cpd_ring` - cp_dtensor's ring called directly: a whole step, or its messages alone.
* :mod:`.torch_ring` - PyTorch's own ring-attention loop, driven with the CPU flash op.
* :mod:`.theory` - the communication minimum and the visible score elements (work) of attention.
* :mod:`.timing` - timing one call and order statistics of repeated timings.
* :mod:`.meters` - instruments: saved-for-backward bytes, attention work, bytes sent, time blocked.
* :mod:`.standins` - communication replaced by local copies (compute without communication).
* :mod:`.rank_bench` - one rank's inputs and step functions for one sequence length.
* :mod:`.verify` - one untimed step per variant: outputs vs SDPA, bytes, work, saved bytes.
* :mod:`.time_rounds` - interleaved timed rounds of every variant.
* :mod:`.overlap` - how much communication the ring hides behind compute.
* :mod:`.profiling` - where the time of one real-ring step goes.
* :mod:`.runner` - spawning the ranks and collecting their raw measurements.
* :mod:`.results` - raw measurements to per-variant metrics.
* :mod:`.bars` - the project's performance bars checked against the metrics.
* :mod:`.machine` - facts about the machine for report headers.
* :mod:`.report` - markdown tables of the metrics.
* :mod:`.plot` - efficiency and step time against the sequence length (matplotlib).
* :mod:`.single_gpu` - the ``--device cuda`` path: the simulated ring vs one SDPA call on one GPU.

Nothing here is imported by training code.
"""
