"""The op contract: what every backend of an op shares, one file per op.

For each ``torch.ops.mmfuse`` op (compiled in ``_C``) and each Triton twin op, the contract
module holds the fake kernels that give ``torch.compile`` and ``torch.export`` the output
shapes, the autograd registration (the backward of a forward op is its ``_bwd`` op), and the
numeric codes an op's schema takes. Backends (``mmfuse.triton``, the compiled ``_C``) import
from here; nothing here imports a backend or ``mmfuse.ops``. Importing a contract module
registers the compiled ops' fake kernels and autograd when ``_C`` is loaded.
"""
