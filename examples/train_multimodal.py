"""Train ``mmfuse.models.MultimodalClassifier`` on a synthetic three-modality "sentiment" task.

Every sample carries one binary cue per modality, drawn independently:

- image (1 × 32 × 32, noisy): a dark or a bright square at a random place;
- text (3 to 16 tokens): a positive or a negative keyword among random filler tokens;
- audio (0.25 to 0.5 s at 16 kHz, noisy): a low (200–400 Hz) or a high (1.2–2 kHz) tone.

The label is the majority vote of the three cues. One modality alone therefore determines the
label only when it agrees with the majority, i.e. 75% of the time; all three give 100%. The
script trains the full model and, for each modality, the same model fed only that modality
(the others absent, as at inference with a missing input), and prints held-out accuracies.

    python examples/train_multimodal.py            # default: larger data, more epochs
    python examples/train_multimodal.py --quick    # a few seconds on 2 CPU cores
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch.nn import functional as F

from mmfuse.models import ClassifierConfig, MultimodalClassifier

MODALITIES = ("image", "text", "audio")
IMAGE_SIZE = 32
SQUARE = 8
VOCAB = 64
PAD, POSITIVE, NEGATIVE = 0, 1, 2  # filler tokens are 3 .. VOCAB - 1
MAX_TOKENS = 16
SAMPLE_RATE = 16000
MAX_SAMPLES = SAMPLE_RATE // 2

# (train samples, test samples, epochs) per mode
SIZES = {"quick": (512, 512, 4), "default": (2048, 1024, 8)}
BATCH = 64


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the experiment; return held-out accuracy per setting ("full", "image", "text", "audio")."""
    args = parse_args(argv)
    device = torch.device(args.device)
    n_train, n_test, epochs = SIZES["quick" if args.quick else "default"]
    generator = torch.Generator().manual_seed(args.seed)
    train, test = make_dataset(n_train, generator), make_dataset(n_test, generator)
    results = {}
    for setting in ("full",) + MODALITIES:
        keep = MODALITIES if setting == "full" else (setting,)
        # the same initialisation and batch order for every setting
        torch.manual_seed(args.seed)
        model = MultimodalClassifier(model_config()).to(device)
        start = time.perf_counter()
        train_model(model, train, keep, epochs, device, label=setting)
        results[setting] = evaluate(model, test, keep, device)
        print(f"{setting:>5}: test accuracy {results[setting]:.3f} ({time.perf_counter() - start:.1f} s)")
    print_table(results)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, few epochs (a few seconds on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help='e.g. "cpu", "cuda"')
    return parser.parse_args(argv)


def model_config() -> ClassifierConfig:
    return ClassifierConfig(
        dim=32, num_heads=4, num_layers=1, ffn_dim=64, image_size=IMAGE_SIZE, patch_size=8, vocab_size=VOCAB,
        max_text_len=MAX_TOKENS, sample_rate=SAMPLE_RATE, max_audio_samples=MAX_SAMPLES, n_mels=32,
        attention_dropout=0.1,  # in the fused cross-attention kernel; torch.manual_seed reproduces it
    )


def make_dataset(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` samples: images, tokens, token_lengths, audio, audio_lengths, label."""
    cues = torch.randint(0, 2, (n, 3), generator=generator)
    tokens, token_lengths = make_text(cues[:, 1], generator)
    audio, audio_lengths = make_audio(cues[:, 2], generator)
    return {
        "images": make_images(cues[:, 0], generator),
        "tokens": tokens,
        "token_lengths": token_lengths,
        "audio": audio,
        "audio_lengths": audio_lengths,
        "label": (cues.sum(1) >= 2).long(),
    }


def make_images(cue: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(n, 1, 32, 32)``: noise plus an 8 × 8 square at a random place, dark for cue 0 and
    bright for cue 1 (its polarity, not its place, so that no position has to be learned)."""
    n = cue.shape[0]
    images = 0.3 * torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    rows = torch.randint(0, IMAGE_SIZE - SQUARE + 1, (n,), generator=generator)
    cols = torch.randint(0, IMAGE_SIZE - SQUARE + 1, (n,), generator=generator)
    contrast = torch.where(cue == 1, 2.0, -2.0)
    for i in range(n):
        images[i, 0, rows[i] : rows[i] + SQUARE, cols[i] : cols[i] + SQUARE] += contrast[i]
    return images


def make_text(cue: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 16)`` ids zero-padded past ``lengths`` ``(n,)`` in [3, 16]; one keyword each,
    POSITIVE for cue 1, NEGATIVE for cue 0, at a random position among filler tokens."""
    n = cue.shape[0]
    lengths = torch.randint(3, MAX_TOKENS + 1, (n,), generator=generator)
    tokens = torch.randint(3, VOCAB, (n, MAX_TOKENS), generator=generator)
    tokens[torch.arange(MAX_TOKENS) >= lengths.unsqueeze(1)] = PAD
    where = (torch.rand(n, generator=generator) * lengths).long()
    tokens[torch.arange(n), where] = torch.where(cue == 1, POSITIVE, NEGATIVE)
    return tokens, lengths


def make_audio(cue: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 8000)`` waveforms zero-padded past ``lengths`` ``(n,)`` in [4000, 8000]: a tone of
    random phase, 200–400 Hz for cue 0 and 1.2–2 kHz for cue 1, plus white noise."""
    n = cue.shape[0]
    lengths = torch.randint(MAX_SAMPLES // 2, MAX_SAMPLES + 1, (n,), generator=generator)
    low = 200 + 200 * torch.rand(n, generator=generator)
    high = 1200 + 800 * torch.rand(n, generator=generator)
    freq = torch.where(cue == 1, high, low).unsqueeze(1)
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    t = torch.arange(MAX_SAMPLES) / SAMPLE_RATE
    audio = 0.5 * torch.sin(2 * math.pi * freq * t + phase) + 0.1 * torch.randn(n, MAX_SAMPLES, generator=generator)
    return audio * (torch.arange(MAX_SAMPLES) < lengths.unsqueeze(1)), lengths


def model_inputs(batch: dict[str, torch.Tensor], keep: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """The ``forward`` arguments for the modalities in ``keep``; the others stay absent."""
    names = {"image": ("images",), "text": ("tokens", "token_lengths"), "audio": ("audio", "audio_lengths")}
    return {name: batch[name].to(device) for modality in keep for name in names[modality]}


def train_model(model, data, keep, epochs: int, device: torch.device, label: str) -> None:
    """AdamW with a cosine schedule; a one-line progress report per step, a summary per epoch."""
    n = data["label"].shape[0]
    steps_per_epoch = math.ceil(n / BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            batch = {k: v[order[step * BATCH : (step + 1) * BATCH]] for k, v in data.items()}
            loss = F.cross_entropy(model(**model_inputs(batch, keep, device)), batch["label"].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
            print(f"\r{label:>5} epoch {epoch + 1}/{epochs} step {step + 1}/{steps_per_epoch} loss {loss.item():.3f}",
                  end="", file=sys.stderr)
        print(f"\r{label:>5} epoch {epoch + 1}/{epochs} mean loss {total_loss / steps_per_epoch:.3f}" + " " * 12,
              file=sys.stderr)


@torch.no_grad()
def evaluate(model, data, keep, device: torch.device) -> float:
    model.eval()
    correct = 0
    for start in range(0, data["label"].shape[0], BATCH):
        batch = {k: v[start : start + BATCH] for k, v in data.items()}
        logits = model(**model_inputs(batch, keep, device))
        correct += (logits.argmax(1).cpu() == batch["label"]).sum().item()
    return correct / data["label"].shape[0]


def print_table(results: dict[str, float]) -> None:
    print("\n| modalities given | test accuracy |\n| --- | --- |")
    for setting, accuracy in results.items():
        given = "image + text + audio" if setting == "full" else f"{setting} only"
        print(f"| {given} | {accuracy:.3f} |")


if __name__ == "__main__":
    main()
