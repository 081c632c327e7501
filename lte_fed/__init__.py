"""lte-fed: pre-train neural networks from scratch with LoRA-the-Explorer (LTE).

This package is pure PyTorch and knows nothing of Flower; `strategies/` and `clients/` build
the Flower server and client sides on top of it.
"""

import importlib

# Imported on first use (PEP 562), so that `import lte_fed.spec` (the config, the report's rules)
# does not pull in torch.
_EXPORTS = {
    "lora": ["LoRALinear", "StackedLoRALinear", "init_lora_A", "merge_update"],
    "lte": ["HeadLTE", "LTEConfig", "ParameterizeError", "StackedLTE", "accounting", "parameterize",
            "parameterize_head"],
    "models": ["build_lm", "build_model", "list_models", "register_lm", "register_model"],
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
