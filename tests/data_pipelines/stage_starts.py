"""Many stage starts in a 2-rank gloo process: each start builds a loader, takes its first batches through worker
processes, all-reduces between ranks (gloo's threads live throughout) and closes the loader, as consecutive
stages do. The test (test_loader.py) checks that it never hangs; run as a module it measures the start-up cost
per stage of each worker start method:

    DS_ACCELERATOR=cpu .venv/bin/python -m tests.data_pipelines.stage_starts
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time


def stage_starts(rank: int, world_size: int, shards: str, tokenizer_dir: str, starts: int, method: str) -> dict:
    """Over `starts` stage starts on this rank: the seconds from each loader's construction to its first batches,
    and how many worker processes were still alive after each close."""
    import multiprocessing

    import torch

    from data_pipelines.batch import workers
    from data_pipelines.batch.loader import MixtureLoader, SourceSpec
    from data_pipelines.synthetic.tiny_tokenizer import load_or_build_tiny_tokenizer

    workers.WORKER_START = method
    tokenizer = load_or_build_tiny_tokenizer(tokenizer_dir)
    seconds, left_alive = [], []
    for start in range(starts):
        began = time.perf_counter()
        loader = MixtureLoader([SourceSpec([f"{shards}/vqa-*.tar"], 1.0, "vqa", "vqa")], tokenizer=tokenizer,
                               template="asagi", tokens_per_image=16, max_length=96, micro_batch_size=4,
                               seed=start, rank=rank, world_size=world_size, num_workers=2, image_size=32,
                               image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
        batches = [next(loader) for _ in range(3)]
        seconds.append(time.perf_counter() - began)
        total = torch.tensor([float(sum(b["input_ids"].shape[0] for b in batches))])
        torch.distributed.all_reduce(total)  # the ranks meet between stages, as a run's barriers do
        loader.close()
        left_alive.append(len(multiprocessing.active_children()))
    return {"seconds": seconds, "left_alive": left_alive}


def main() -> None:
    from data_pipelines.synthetic.synth import synthesize
    from tests.ranks import run_on_ranks

    starts = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(f"{tmp}/shapes", samples=200, seed=0, samples_per_shard=50, image_size=32)
        for method in ("fork", "forkserver", "spawn"):
            per_rank = run_on_ranks(stage_starts, f"{tmp}/shapes", f"{tmp}/tok", starts, method)
            first = [r["seconds"][0] for r in per_rank]
            later = [s for r in per_rank for s in r["seconds"][1:]]
            print(f"{method:10s} first start {max(first):.2f} s, later starts median {statistics.median(later):.2f} s "
                  f"(2 ranks x {starts} starts)", flush=True)


if __name__ == "__main__":
    main()
