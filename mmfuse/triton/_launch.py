"""How mmfuse registers and launches Triton kernels.

On a GPU, launchers are ``torch.library.triton_op`` custom ops whose kernels go through
``wrap_triton``, so ``torch.compile`` traces into them. Under ``TRITON_INTERPRET=1`` (CPU
tensors, how CI runs Triton) ``wrap_triton`` refuses interpreted kernels, so the same
launcher becomes a plain ``torch.library.custom_op`` that launches the kernel directly;
autograd and fake kernels are registered on either kind the same way.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.library import wrap_triton

from mmfuse.backends import triton_interpreted


def launch(kernel):
    """The kernel itself under the interpreter, else its ``wrap_triton`` handle."""
    return kernel if triton_interpreted() else wrap_triton(kernel)


def triton_custom_op(name: str, fake: Callable | None = None, triton_only_args: int = 0):
    """Decorator: register a Triton launcher as the custom op ``name``.

    ``fake`` is needed only by the interpreted (plain custom op) form; ``triton_op`` derives
    its fake kernel by tracing the launcher. It is the fake of the compiled twin op, which
    lacks the launcher's last ``triton_only_args`` arguments (e.g. ``allow_tf32``).
    """
    if fake is not None and triton_only_args:
        twin_fake = fake

        def fake(*args):
            return twin_fake(*args[: len(args) - triton_only_args])


    def register(fn):
        if not triton_interpreted():
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        if fake is not None:
            op.register_fake(fake)
        return op

    return register
