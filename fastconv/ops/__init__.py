"""The registered ``torch.ops.fastconv.*`` custom ops; importing this package registers them."""
from . import conv  # noqa: F401
