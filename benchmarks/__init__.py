"""GPU benchmark harness of cpt-plugin: workloads, systems, workers, search, kernels and reports.

Entry points: ``python -m benchmarks.run`` (training throughput, memory, max context),
``python -m benchmarks.kernels`` (kernel micro-benchmarks), ``python -m benchmarks.report`` (tables, PNGs,
docs/BENCHMARKS.md) and ``bash benchmarks/gpu_check.sh`` (everything, on the GPU machine, in one command).
"""
