"""fastconv's CPU kernels, written with Numba."""
import os as _os

from .. import config as _config
from . import kernel_cache as _kernel_cache

# before any kernel module is imported: a kernel's cache locator is chosen when it is decorated
_kernel_cache.install()
_config.announce_first_compile(_os.path.dirname(__file__))
