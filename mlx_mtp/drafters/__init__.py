from .base import Drafter
from .mtp import MTPDrafter

__all__ = ["Drafter", "MTPDrafter"]
