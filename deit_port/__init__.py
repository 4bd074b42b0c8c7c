"""deit_port: convert timm DeiT checkpoints to Hugging Face transformers, with proven parity.

The public names are `deit_port.convert`'s, the same list here (`__all__`)."""

from importlib.metadata import version

from .convert import *
from .convert import __all__ as __all__

__version__ = version("deit-port")  # the one place it is set: pyproject.toml
