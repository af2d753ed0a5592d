"""The stages of tools/gpu_check.py, one module each, run as ``python3 -m gpu_check_stages.NAME``.

environment (wheels, GPU, versions, packages, torch APIs), correctness (the CUDA tests),
block (tools/bench_block.py), generation (tools/bench_generate.py), training (torchtitan's
trainer on the shipped 1.3B configs). ``_stage`` holds their shared protocol.
"""
