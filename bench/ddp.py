"""Seconds per training step: one process vs torchrun ranks (DDP), the same config and global batches.

    python bench/ddp.py --cache cache --ranks 2 --steps 60           # the demo recipe's config, CPU
    python bench/ddp.py --cache cache --ranks 4 --device cuda --steps 200

Needs the demo stores (`fusionpipe extract --model toy-wavlm,toy-whisper --cache DIR`). Each
setting runs `fusionpipe train` for S and 2S steps (no dev set); (wall(2S) - wall(S)) / S is the
time per step with start-up (imports, process group, first reads) cancelled out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusionpipe.train.defaults import DEMO, demo_stores  # noqa: E402


def wall(ranks: int, steps: int, args, out: Path) -> float:
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
                                 if ranks > 1 else [])
    cmd = launch + ["-m", "fusionpipe", "train", "--stores", ",".join(demo_stores(args.cache)[0]),
                    "--steps", str(steps), "--eval-every", str(steps), "--lr", str(DEMO["lr"]),
                    "--max-frames", str(args.max_frames), "--device", args.device, "--out", str(out)]
    cmd += [x for k, v in DEMO["head_options"].items() for x in ("--head-option", f"{k}={v}")]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)  # torchrun gives each rank 1 thread; 1 process: cores - 1
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default="cache")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--max-frames", type=int, default=DEMO["max_frames"])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(f"| processes | s/step | vs 1 process |  (demo asr config, max_frames {args.max_frames}, {args.device}, "
          f"{os.cpu_count()} cores)")
    print("|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, args.ranks):
            short = wall(ranks, args.steps, args, Path(tmp) / f"{ranks}-short")
            long = wall(ranks, 2 * args.steps, args, Path(tmp) / f"{ranks}-long")
            per_step = (long - short) / args.steps
            base = base or per_step
            print(f"| {ranks} | {per_step:.3f} | {base / per_step:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
