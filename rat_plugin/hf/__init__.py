"""RAT models in Hugging Face transformers (the ``hf`` extra).

    import rat_plugin.hf  # registers model type "rat" with AutoConfig / AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("rat_hf")   # a folder from --to-hf
    model.generate(input_ids, max_new_tokens=64)             # RAT's chunk caches

The classes wrap the project's model and caches (no second copy of the model code). An export
also carries its own code, generated from this package (``remote_code``), so it loads with
``trust_remote_code=True`` where rat_plugin is not installed.
"""

try:
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError:
    raise ImportError(
        "rat_plugin.hf needs transformers: pip install -e '.[hf]' (transformers==5.23.0)"
    ) from None

from rat_plugin.hf.configuration import RATConfig
from rat_plugin.hf.modeling import RATForCausalLM, RATGenerationCache

AutoConfig.register(RATConfig.model_type, RATConfig, exist_ok=True)
AutoModelForCausalLM.register(RATConfig, RATForCausalLM, exist_ok=True)

__all__ = ["RATConfig", "RATForCausalLM", "RATGenerationCache"]
