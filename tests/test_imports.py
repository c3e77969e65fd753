"""The package's imports point one way, down (DESIGN.md, "Layout"), and every module imports on
its own in a fresh interpreter, with and without the compiled extension.

Layers, top to bottom: the package and the benchmarks; ``models``; ``nn``; ``ops``; the
backends (``triton``, ``reference``); the op contract (``contract``) and the audio
configuration (``audio``) and the key-range builders (``masks``); ``_checks`` and ``backends``; ``_extension``
(loads ``_C``). A module may import from
its own subpackage or from a lower layer, never from a higher one, and no import cycle exists.
"""
import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmfuse"

LAYERS = {
    "mmfuse": 7, "mmfuse.bench": 7,
    "mmfuse.models": 6,
    "mmfuse.nn": 5,
    "mmfuse.ops": 4,
    "mmfuse.triton": 3, "mmfuse.reference": 3,
    "mmfuse.contract": 2, "mmfuse.audio": 2, "mmfuse.masks": 2,
    "mmfuse._checks": 1, "mmfuse.backends": 1,
    "mmfuse._extension": 0,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _group(module: str) -> str:
    """The layer entry a module belongs to: its longest prefix in LAYERS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} is in no layer of LAYERS: add it there")


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (absolute imports, at any depth of the file)."""
    edges = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            found = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            targets.update(t for t in found if t in mods and t != name and not name.startswith(t + "."))
        edges[name] = targets
    return edges


def test_every_module_has_a_layer():
    for name in _modules():
        _group(name)


def test_imports_point_down():
    edges = _imports(_modules())
    upward = [
        f"{src} ({_group(src)}) imports {dst} ({_group(dst)})"
        for src, dsts in edges.items() for dst in dsts
        if _group(src) != _group(dst) and LAYERS[_group(dst)] >= LAYERS[_group(src)]
    ]
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_no_import_cycle():
    edges = _imports(_modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


# Each module is imported first, in a process forked from one that has imported only torch and
# triton (a fresh interpreter as far as mmfuse is concerned, without paying their import per module),
# then every other module after it. A cycle shows up as a partially initialised module, an
# import-time dependency on _C as a failure when _C is blocked.
_IMPORT_EACH_FIRST = textwrap.dedent(
    """
    import importlib, json, os, sys, traceback, warnings
    # third-party imports the children share (not mmfuse's): each child still starts mmfuse cold
    import numpy, torch, torch._dynamo, torch.fx.experimental.symbolic_shapes
    try:
        import triton, triton.language
    except ImportError:
        pass
    try:  # what mmfuse.integrations.transformers takes from it: 1.4 s of each child's 1.8 s
        import transformers, transformers.masking_utils
        transformers.AttentionInterface
    except ImportError:
        pass
    block_c = sys.argv[1] == "block"
    modules = json.loads(sys.argv[2])
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "mmfuse._C":
                raise ImportError("mmfuse._C blocked for the test")
    failures = {}
    for first in modules:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            if block_c:  # no compiled kernels: neither _C nor the op library
                sys.meta_path.insert(0, Block())
                import torch
                def blocked(path):
                    raise OSError("the op library blocked for the test")
                torch.ops.load_library = blocked
            warnings.simplefilter("ignore")
            try:
                for name in [first] + [m for m in modules if m != first]:
                    importlib.import_module(name)
                message = ""
            except BaseException:
                message = traceback.format_exc()
            os.write(write, message.encode())
            os._exit(0)
        os.close(write)
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        os.close(read)
        _, status = os.waitpid(pid, 0)
        message = b"".join(chunks).decode()
        if message or status != 0:
            failures[first] = message or f"exit status {status}"
    print(json.dumps(failures))
    """
)


@pytest.mark.parametrize("extension", ["with_C", "without_C"])
def test_each_module_imports_first_in_a_fresh_interpreter(extension):
    modules = sorted(_modules())
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_FIRST, "block" if extension == "without_C" else "keep", json.dumps(modules)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"importing {m} first:\n{tb}" for m, tb in failures.items())
