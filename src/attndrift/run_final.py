"""A training run's final evaluation: the checkpoint ``eval.checkpoint`` names (the last
step's weights, or the best validation epoch's, restored), measured by the evaluation phases
a measured checkpoint goes through too (`attndrift.phases`), its weights and attention samples
written, and the record's ``final``, ``zeroshot`` and ``timing`` filled in."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attndrift.data.registry import load_task
from attndrift.data.robustness import robustness_summary
from attndrift.evaluate import zeroshot_summary
from attndrift.models.classifier import trainable_state
from attndrift.phases import evaluate_final, final_record
from attndrift.records import Evaluated
from attndrift.run_setup import Setup
from attndrift.runtime import BestWeights, LoopState, board_metrics, save_weights
from attndrift.signals import ATTENTION_SAMPLES


def evaluated_checkpoint(s: Setup, state: LoopState, best: BestWeights) -> Evaluated:
    """The checkpoint the final evaluation measures (``eval.checkpoint``), loaded into the
    model: the last step's weights, or the best validation epoch's, restored."""
    if s.cfg.eval.checkpoint == "final":
        return Evaluated("final", state.epoch, state.step)
    if state.best_epoch == 0:  # a guard stopped the run before its first epoch ended
        s.record.warnings = [*(s.record.warnings or []), "eval.checkpoint=best: no epoch "
                             "ended before training stopped; the final weights were evaluated"]
        return Evaluated("final", state.epoch, state.step)
    s.model.load_state_dict(best.weights(state.best_epoch), strict=False)
    step = next(e["step"] for e in state.history["epochs"] if e["epoch"] == state.best_epoch)
    return Evaluated("best", state.best_epoch, step)


def final_evaluation(s: Setup, state: LoopState, best: BestWeights, board, last_attn: torch.Tensor,
                     accuracy: Callable[..., float]) -> None:
    """Measure the evaluated checkpoint (probe subsets, zero-shot, auxiliary metrics, the test
    split read once, scored by ``accuracy``), write the weights and attention samples, and
    fill in the record; ``last_attn`` is the last probe's attention (of the final weights),
    ``board`` the run's `attndrift.trackers.Trackers`."""
    cfg, history, record, step = s.cfg, state.history, s.record, state.step
    best.write()
    if cfg.save_checkpoints:
        save_weights(s.out_dir / "final.safetensors", trainable_state(s.model, "cpu"),
                     {**s.meta, "step": str(step)})
    evaluated = evaluated_checkpoint(s, state, best)
    test_set = load_task(cfg.data.dataset, "test", image_size=s.loaded.image_size)
    ev = evaluate_final(
        s.probe_of, s.probe_set.images, s.subsets,
        zeroshot=lambda: s.zeroshot(s.zs_weights, s.zs_tasks, detail=True),
        aux=lambda: s.aux_of(state.aux_ref, s.pretrained_weights)[0],
        test_acc=lambda: accuracy(s.model, test_set, s.preprocess, s.device,
                                  cfg.data.eval_batch_size, cfg.train.precision),
        # the final step is always a probe point: its probe measured the final weights
        attn=last_attn if evaluated.checkpoint == "final" else None)
    save_weights(s.out_dir / "attention.safetensors",
                 {"pretrained": state.base_attn, "final": ev.attn[:ATTENTION_SAMPLES],
                  "labels": s.probe_set.labels[s.subsets[0]][:ATTENTION_SAMPLES],
                  "images": s.probe_images[:ATTENTION_SAMPLES]}, s.meta)
    val_acc = next((e["val_acc"] for e in reversed(history["epochs"])
                    if e["epoch"] == evaluated.epoch), None)
    record.final = final_record(
        ev.metrics, ev.subsets, ev.aux, record.baseline, test_acc=ev.test_acc,
        val_acc=val_acc, best_val_acc=state.best_val, best_epoch=state.best_epoch, step=step,
        epochs=step / s.steps_per_epoch, evaluated=evaluated,
        train_loss=history["loss"][-1]["loss"] if history["loss"] else None)
    record.zeroshot = zeroshot_summary(state.zs_before, ev.zeroshot, s.zs_tasks, s.zs_prompts)
    if s.robust:  # corrupted test splits, scored like the test split
        record.robustness = robustness_summary(
            {n: accuracy(s.model, t, s.preprocess, s.device, cfg.data.eval_batch_size,
                         cfg.train.precision) for n, t in s.robust.items()}, ev.test_acc,
            s.robust)
    if board:
        board_metrics(board, ev.metrics, record.baseline, step)
        for name, z in record.zeroshot.items():
            board.scalar(f"zeroshot/{name}", z["after"], step)
        board.scalar("test/accuracy", ev.test_acc, step)
    train_s = state.train_s
    record.timing.update({"train_s": train_s, "probe_s": state.probe_s,
                          "zeroshot_s": state.zeroshot_s + ev.zeroshot_s,
                          "aux_s": state.aux_s + ev.aux_s,
                          "steps": step, "probes": len(history["probes"]) + 1,
                          "train_images_per_s": step * s.epoch_images / s.steps_per_epoch
                          / train_s if train_s > 0 else None})
