"""Model architectures keyed by `general.architecture`; importing this registers all of them."""

from runtime.models import gemma, llama, qwen  # noqa: F401  (registration side effects)
from runtime.models.registry import ARCHITECTURES, model_config

__all__ = ["ARCHITECTURES", "model_config"]
