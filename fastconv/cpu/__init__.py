"""fastconv's CPU kernels, written with Numba."""
import os as _os

from .. import config as _config

_config.announce_first_compile(_os.path.dirname(__file__))
