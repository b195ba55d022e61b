"""DeepSeek-V3 architecture: config, modules and checkpoint loading."""
from .config import ConfigError, ModelConfig
from .deepseek import DeepseekV3
from .loader import CheckpointError, iter_checkpoint, load_model, load_weights

__all__ = ["ConfigError", "ModelConfig", "DeepseekV3", "CheckpointError", "iter_checkpoint", "load_model",
           "load_weights"]
