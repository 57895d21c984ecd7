"""Multi-GPU check (issue 6, item 4): DDP, FSDP2 and DeepSpeed ZeRO-2 against a single-process run.

``train.py`` is one training run (plain ``python`` for the reference, ``accelerate launch`` for the
engines); ``compare.py`` turns the JSON files into a table and fails on a loss mismatch;
``bash benchmarks/multi_gpu_check.sh`` runs everything on the 2-GPU machine in one command.
"""
