from .base import Drafter
from .combined import LookupThenModelDrafter
from .mtp import MTPDrafter
from .ngram import NGramDrafter

__all__ = ["Drafter", "LookupThenModelDrafter", "MTPDrafter", "NGramDrafter"]
