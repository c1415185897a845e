"""icl_scale: which attention heads and FFN blocks does in-context learning need?"""

__version__ = "0.1.0"
