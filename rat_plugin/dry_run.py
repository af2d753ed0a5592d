"""The GPU recipe's dry run on CPU ranks (``custom_import = "rat_plugin.dry_run"``).

Loads the plugin (``rat_plugin.train_spec``) and makes the trainer run the program a GPU runs:
``auto`` kernels resolve as on CUDA (the Triton scan custom op, whose CPU body runs here, and
flex_attention with our BlockMasks), and torch's CPU guard against flex_attention backward is
lifted (torch 2.13 refuses it in the frontend, although the flex HOP's reference implementation,
which then runs, has a backward on every device). Never import this for real training: on CPU
the portable kernels are the fast ones. ``tools/dry_run.py`` runs a shipped config this way at
debug size (docs/design.md, "Dry run").
"""

import torch.nn.attention.flex_attention as flex_frontend
import torchtitan.components.quantization.float8 as titan_float8

from rat_plugin.infra import cpu

flex_frontend._validate_device = lambda query, key, value: None
# float8: torchtitan allows compile only on SM89+ GPUs; torch._scaled_mm runs on CPU as well.
titan_float8.has_cuda_capability = lambda major, minor: True
cpu.KERNELS_AS_ON_CUDA = True

import rat_plugin.train_spec  # noqa: E402,F401  (registers the model family)
