"""Gate modules (`LayerGate`, `ChannelGate`) and their decision heads (`register_head`)."""

from .heads import HEADS, GateHead, register_head
from .modules import ChannelGate, Gate, LayerGate

__all__ = ["HEADS", "ChannelGate", "Gate", "GateHead", "LayerGate", "register_head"]
