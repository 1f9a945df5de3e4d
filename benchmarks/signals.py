"""The per-epoch cost of tracking the predictor signals, as a share of training.

    python benchmarks/signals.py                      # shipped tiny CLIP, the demo's epoch
    python benchmarks/signals.py --model vit-b32      # ViT-B/32 shapes (random weights)

Tracking the signals every epoch (issue 23) adds, per epoch: the auxiliary metrics on the 200
probe images (`probe.aux_every`: rollout, CKA to the pretrained model, embedding and weight
drift) and zero-shot accuracy on the fixed subset of each transfer task (`probe.zeroshot_every`,
`probe.zeroshot_images`). The attention probe and the validation pass run anyway. This measures
the pieces with the library's own functions (`pieces.bench_model`: training steps, probe,
`auxiliary_metrics`, `zeroshot_all`) and prints, for the demo's epoch (tiny CLIP) or the later
protocol's epochs (ViT-B/32: EuroSAT 1,600 and Pets 1,480 training images, one 1,000-image
CIFAR-100 track), the seconds each adds and their share of the epoch's training steps.
Timings are the best of a few repeats in this process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pieces
import run as bench

# (label, training images per epoch, probe images, zero-shot track images per task, tasks)
EPOCHS = {
    "tiny": [("demo (shapes-objects)", 1_920, 200, 200, 2)],
    "vit-b32": [("later protocol, EuroSAT", 1_600, 200, 1_000, 1),
                ("later protocol, Pets", 1_480, 200, 1_000, 1)],
}


def costs(p: dict[str, float], train: int, probe: int, track: int, tasks: int
          ) -> dict[str, float]:
    """Seconds per epoch of the training steps (full FT), the auxiliary metrics and the
    zero-shot track, from the measured pieces."""
    train_s = train / 64 * p["step_s_full_ft"]
    aux_s = p["aux_s"] * probe / 200
    track_s = tasks * track / p["zeroshot_images_per_s"]
    return {"train_s": train_s, "aux_s": aux_s, "track_s": track_s,
            "share_pct": 100 * (aux_s + track_s) / train_s}


def main(argv: list[str] | None = None) -> list[dict]:
    args = bench.parse_args(["--rows", "model", *(argv or sys.argv[1:])])
    args.project = True  # measure the per-run pieces (aux, zero-shot rate) too
    device = torch.device(args.device)
    _, measured = pieces.bench_model(args, device)
    rows = [{"model": args.model, "epoch": label, **costs(measured, *sizes)}
            for label, *sizes in EPOCHS[args.model]]
    print(f"signal tracking per epoch, {args.model} on {device} "
          f"(full FT step {measured['step_s_full_ft'] * 1e3:.1f} ms per 64 images)")
    print(f"{'epoch':<28}{'train s':>9}{'aux s':>8}{'track s':>9}{'share':>8}")
    for r in rows:
        print(f"{r['epoch']:<28}{r['train_s']:>9.2f}{r['aux_s']:>8.2f}{r['track_s']:>9.2f}"
              f"{r['share_pct']:>7.1f}%")
    return rows


if __name__ == "__main__":
    main()
