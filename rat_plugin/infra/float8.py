"""Which Linear layers float8 training converts (torchao's ``module_filter_fn`` contract).

With torchtitan's converter (``[model] converters = ["quantize.linear.float8"]``) the same effect
comes from ``[quantize.linear.float8] filter_fqns = ["output", "mixer.wq", "mixer.wk"]``: its
default filter already skips Linears whose dims are not multiples of 16. Skipped here:

- ``mixer.wq`` / ``mixer.wk``: RAT's grouped projections are small (G*d outputs) and replicated
  under tensor parallel, where float8 styles do not apply;
- ``output``: its weight is tied to the token embedding;
- any Linear with a dim that is not a multiple of 16 (float8 tensor-core requirement).

The FQN patterns also match the wq/wk of SWA layers, which then stay in high precision too (two
of the four projections of every other mixer: a small share of the model's FLOPs).
"""

from torch import nn

FLOAT8_FILTER_FQNS: tuple[str, ...] = ("output", "mixer.wq", "mixer.wk")


def float8_module_filter(
    module: nn.Module, fqn: str, filter_fqns: tuple[str, ...] | list[str] = FLOAT8_FILTER_FQNS
) -> bool:
    """True when ``module`` (at ``fqn``) should become a Float8Linear."""
    if not isinstance(module, nn.Linear):
        return False
    out_features, in_features = module.weight.shape
    if out_features % 16 or in_features % 16:
        return False
    return not any(name in fqn for name in filter_fqns)
