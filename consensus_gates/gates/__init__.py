"""Gate modules (`LayerGate`, `ChannelGate`) and their decision heads (`register_head`)."""

from .modules import ChannelGate, Gate, LayerGate

__all__ = ["ChannelGate", "Gate", "LayerGate"]
