"""lte-fed: pre-train neural networks from scratch with LoRA-the-Explorer (LTE).

This package is pure PyTorch and knows nothing of Flower; `strategies/` and `clients/` build
the Flower server and client sides on top of it.
"""

from .lora import LoRALinear, StackedLoRALinear, init_lora_A, merge_update
from .lte import HeadLTE, LTEConfig, ParameterizeError, StackedLTE, accounting, parameterize, parameterize_head
from .models import build_lm, build_model, list_models, register_lm, register_model

__all__ = [
    "LoRALinear", "StackedLoRALinear", "init_lora_A", "merge_update",
    "HeadLTE", "LTEConfig", "ParameterizeError", "StackedLTE", "accounting", "parameterize", "parameterize_head",
    "build_lm", "build_model", "list_models", "register_lm", "register_model",
]
