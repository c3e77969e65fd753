"""Checks that the op library calls torch only through the LibTorch stable ABI.

    python tools/check_abi.py [path/to/_ops.abi3.so]     (default: the one mmfuse loads)

Lists the library's undefined dynamic symbols (``nm -D --undefined-only``, demangled) and fails
if any is a C++ symbol of torch (the ``at::``, ``c10::``, ``torch::`` or ``caffe2::`` namespaces),
a Python C-API symbol (the library has none: it loads through ``torch.ops.load_library``), or one
of Sleef's (the vector math ATen links: ours is csrc/cpu/vec.h). What it may take from torch is
the C shims: ``aoti_torch_*``, ``torch_*``. Prints the verdict and the shim functions used, one
line each, so a CI log shows what the library depends on.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

FORBIDDEN = re.compile(r"\b(at|c10|torch|caffe2)::|^_?Py[A-Z_]|^Sleef_")
SHIM = re.compile(r"^(aoti_torch_|torch_)\w+$")


def undefined_symbols(library: Path) -> list[str]:
    if shutil.which("nm") is None:
        raise SystemExit("check_abi: nm (binutils) is not installed")
    out = subprocess.run(["nm", "-D", "--undefined-only", "-C", str(library)], capture_output=True, text=True,
                         check=True).stdout
    # each line: "<type> <name>[@VERSION]"; a demangled C++ name may hold spaces
    return [line.strip().split(None, 1)[1].split("@")[0] for line in out.splitlines() if line.strip()]


def check(library: Path) -> tuple[list[str], list[str]]:
    """(forbidden symbols, torch C shim symbols) among the library's undefined dynamic symbols."""
    symbols = undefined_symbols(library)
    return [s for s in symbols if FORBIDDEN.search(s)], sorted(s for s in symbols if SHIM.match(s))


def main(argv: list[str]) -> int:
    if argv:
        library = Path(argv[0])
    else:
        from mmfuse import _extension

        library = _extension.ops_library_path()
        if library is None:
            raise SystemExit("check_abi: mmfuse's op library is not built")
    bad, shims = check(library)
    print(f"check_abi: {library}: {len(shims)} torch C shim functions used, {len(bad)} forbidden symbols")
    for s in shims:
        print(f"  shim {s}")
    for s in bad:
        print(f"  FORBIDDEN {s}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
