"""The README's front door stays true: its example runs and prints what it says, on the C++
kernels; the picture and the documents it links to exist."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    first_block = README.split("```")[1]
    assert "make bench" in first_block and "make test" in first_block


def test_readme_example_runs():
    example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert len(example.strip().splitlines()) <= 16
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # (B, Lq, E), (B, n_mels, frames), valid frames per clip (48000 and 30000 samples at hop 160)
    assert result.stdout.startswith("(2, 77, 512) (2, 80, 300) [300, 187] ['cpu', 'reference']"), result.stdout
    assert "RuntimeWarning" not in result.stderr, result.stderr


def test_readme_links_exist():
    targets = re.findall(r"\]\(([^)#]+)\)", README)
    assert "docs/attention.md" in targets and "benchmarks/results/cpu-2threads.png" in targets
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert not missing, missing
