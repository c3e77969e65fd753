"""MultimodalClassifier on 2 CPU processes (gloo) trains as one process on the whole batch:
under DistributedDataParallel (one SGD step, every gradient and parameter) and under FSDP2
(``fully_shard``, issue #27 item 6: a few SGD-with-momentum steps, the losses and the gathered
parameters)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from mmfuse.models import ClassifierConfig, MultimodalClassifier

WORLD_SIZE = 2
PER_RANK = 3
# dropout 0 (the default): the two runs draw no random numbers after initialisation
CONFIG = ClassifierConfig(
    dim=16, num_heads=2, num_layers=1, ffn_dim=24, image_size=16, patch_size=4, vocab_size=29, max_text_len=7,
    max_audio_samples=1200, n_mels=12, num_classes=3,
)
LR = 0.1


def global_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """WORLD_SIZE * PER_RANK samples with every modality and varied lengths, and labels."""
    g = torch.Generator().manual_seed(7)
    n = WORLD_SIZE * PER_RANK
    token_lengths = torch.randint(0, CONFIG.max_text_len + 1, (n,), generator=g)
    audio_lengths = torch.randint(0, CONFIG.max_audio_samples + 1, (n,), generator=g)
    tokens = torch.randint(1, CONFIG.vocab_size, (n, CONFIG.max_text_len), generator=g)
    tokens[torch.arange(CONFIG.max_text_len) >= token_lengths.unsqueeze(1)] = 0
    audio = torch.randn(n, CONFIG.max_audio_samples, generator=g)
    inputs = {
        "images": torch.randn(n, 1, CONFIG.image_size, CONFIG.image_size, generator=g),
        "tokens": tokens,
        "token_lengths": token_lengths,
        "audio": audio * (torch.arange(CONFIG.max_audio_samples) < audio_lengths.unsqueeze(1)),
        "audio_lengths": audio_lengths,
    }
    return inputs, torch.randint(0, CONFIG.num_classes, (n,), generator=g)


def sgd_step(model: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> None:
    """One SGD step on the mean cross-entropy. Under DDP the gradients are averaged over the
    ranks: with equal shards, the average of the shard means is the global batch's mean."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    F.cross_entropy(model(**inputs), labels).backward()
    optimizer.step()


def snapshot(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        # a different initialisation per rank: DDP must broadcast rank 0's (seed 0, as the reference)
        torch.manual_seed(rank)
        model = DistributedDataParallel(MultimodalClassifier(CONFIG))
        inputs, labels = global_batch()
        shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        sgd_step(model, {k: v[shard] for k, v in inputs.items()}, labels[shard])
        torch.save(snapshot(model.module), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_equals_single_process_step_on_the_global_batch(tmp_path):
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    torch.manual_seed(0)
    model = MultimodalClassifier(CONFIG)
    sgd_step(model, *global_batch())
    want = snapshot(model)

    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for kind in ("grads", "params"):
            assert got[kind].keys() == want[kind].keys()
            for name in want[kind]:
                torch.testing.assert_close(got[kind][name], want[kind][name], atol=1e-6, rtol=1e-5, msg=f"rank {rank} {kind} {name}")


FSDP_STEPS = 4


def train(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, world_size: int = 1) -> list[float]:
    """FSDP_STEPS steps of SGD with momentum (optimizer state, sharded under FSDP2) on the mean
    cross-entropy; the losses, averaged over the ranks (the global batch's mean loss with equal
    shards)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for _ in range(FSDP_STEPS):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(**inputs), labels)
        loss.backward()
        optimizer.step()
        loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world_size)
    return losses


def fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        # FSDP2 does not broadcast: every rank initialises as the reference (seed 0)
        torch.manual_seed(0)
        model = MultimodalClassifier(CONFIG)
        for encoder in (model.image_encoder, model.text_encoder):
            for layer in encoder.layers:
                fully_shard(layer)
        fully_shard(model)
        params = dict(model.named_parameters())
        sharded = all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params.values())
        local = sum(p.to_local().numel() for p in params.values())
        inputs, labels = global_batch()
        shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        losses = train(model, {k: v[shard] for k, v in inputs.items()}, labels[shard], WORLD_SIZE)
        full = {n: p.full_tensor() for n, p in params.items()}  # a collective: every rank calls it
        torch.save({"losses": losses, "params": full, "sharded": sharded, "local_numel": local},
                   os.path.join(out_dir, f"fsdp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_training_equals_single_process_on_the_global_batch(tmp_path):
    mp.spawn(fsdp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    torch.manual_seed(0)
    model = MultimodalClassifier(CONFIG)
    want_losses = train(model, *global_batch())
    want = {n: p.detach() for n, p in model.named_parameters()}
    total = sum(p.numel() for p in want.values())
    assert want_losses[-1] < want_losses[0]  # it trains

    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"fsdp{rank}.pt")
        # every parameter a dim-0 shard; each rank holds about half (dim 0 padded to the world size)
        assert got["sharded"], f"rank {rank}: parameters not all Shard(0) DTensors"
        assert total / WORLD_SIZE - 100 <= got["local_numel"] <= total / WORLD_SIZE + 100, (got["local_numel"], total)
        print(f"rank {rank} losses {got['losses']}, single process {want_losses}")
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want_losses), atol=1e-6, rtol=1e-5)
        assert got["params"].keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got["params"][name], want[name], atol=1e-6, rtol=1e-5, msg=f"rank {rank} {name}")
