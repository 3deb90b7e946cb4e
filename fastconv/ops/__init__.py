"""The registered ``torch.ops.fastconv.*`` custom ops; importing this package registers them, and
(:mod:`.catalog`) registers the implementations the kernel modules declare."""
from . import conv  # noqa: F401
from . import pool  # noqa: F401
from . import transposed  # noqa: F401
from . import separable  # noqa: F401
from . import fused  # noqa: F401  (conv + bias + activation, for fastconv.optimize)
from . import catalog  # noqa: F401  (kernel declarations -> registry and pooling table)

from ._first_call import skip_eager_dynamo_import as _skip_eager_dynamo_import

_skip_eager_dynamo_import()

# Around the registered ops: autocast rules (conv runs in the autocast dtype, as torch's).
from . import autocast  # noqa: E402,F401
# torch.func transforms over the ops' autograd (grad, jacrev, vmap(grad)): see func.py; vmap rules: batching.py.
from . import batching  # noqa: E402,F401
from . import func as _func  # noqa: E402

_func.install()
