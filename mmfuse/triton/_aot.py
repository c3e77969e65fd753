"""What a Triton kernel is launched with, for compiling it ahead of time without a GPU.

Each kernel module keeps, next to its launcher, an ``aot_cases()`` table of ``AotCase``: the
argument types, constexpr values and launch options (``num_warps``, ``num_stages``) the launcher
can produce, built from the same block-size choices and autotune config lists the launcher uses.
``mmfuse.triton.aot_check`` compiles every case for the GPUs we ship to (DESIGN.md, "Triton
ahead of time").
"""
from __future__ import annotations

import dataclasses

import torch
import triton

# Triton's argument type names for the tensors our launchers pass
_POINTER_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
    torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64",
}


@dataclasses.dataclass(frozen=True)
class AotCase:
    """One compilation: ``kernel`` (a ``triton.jit`` function) with ``signature`` (argument
    name -> Triton type, ``"constexpr"`` for the keys of ``constexprs``) and launch options.
    ``label`` names the case in reports (dtype and the launcher's choice it stands for)."""

    kernel: triton.runtime.JITFunction
    signature: dict
    constexprs: dict
    label: str
    num_warps: int = 4
    num_stages: int = 3

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def config(self) -> str:
        """The constexprs and options a reader tells configs apart by."""
        blocks = " ".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK"))
        return f"{blocks} w{self.num_warps} s{self.num_stages}"


def jit_function(kernel) -> triton.runtime.JITFunction:
    """The ``triton.jit`` function under an autotuner (or the function itself)."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def kernel_case(kernel, label: str, pointers: dict, constexprs: dict, floats=(), ones=(),
                config: triton.Config | None = None) -> AotCase:
    """An ``AotCase`` for ``kernel`` launched with tensors of ``pointers`` (argument name ->
    torch dtype), float scalars ``floats``, integer arguments ``ones`` equal to 1 (a unit stride:
    Triton specialises 1 into a constant), other integers as i32, and ``constexprs`` (plus
    ``config``'s, with its warps and stages, when autotuned)."""
    fn = jit_function(kernel)
    constexprs = dict(constexprs)
    options = {}
    if config is not None:
        constexprs.update(config.kwargs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ones:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in pointers:
            signature[name] = _POINTER_TYPES[pointers[name]]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    unknown = (set(pointers) | set(floats) | set(ones) | set(constexprs)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown)}")
    return AotCase(fn, signature, constexprs, label, **options)


def tuned_configs(kernel, pointers: dict, constexprs: dict) -> list[triton.Config]:
    """The configs ``kernel``'s autotuner tries for a launch with tensors of ``pointers``'
    dtypes and ``constexprs``: its config list after its own ``early_config_prune``."""
    configs = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune:
        named_args = {name: torch.empty(0, dtype=dtype) for name, dtype in pointers.items()}
        configs = list(prune(configs, named_args, **constexprs))
    return configs
