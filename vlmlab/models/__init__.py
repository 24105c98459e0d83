"""Mini-Gemini model, processor, presets. Importing this package registers `mgm` with the Auto classes."""
from vlmlab.models.mgm import MgmConfig, MgmForConditionalGeneration  # noqa: F401  (registers)

__all__ = ["MgmConfig", "MgmForConditionalGeneration"]
