"""The `pformer_pretrain` task: LAVIS's training loop, logging each loss on its own.

LAVIS's BaseTask logs only `loss`. `LossLoggingMixin` also logs every scalar `loss_*` the
model returns (P-Former: loss_recon / loss_contrast / loss_vocab; stage 1: loss_itc / loss_itm
/ loss_lm / loss_align; stage 2: loss_lm / loss_align): every `log_freq` iterations in the
log, and as epoch averages in the stats the runner writes to log.txt (train_loss_align, ...).

Evaluation (stage 0, held-out sentences): teacher-forced reconstruction through the frozen
LLM from the P-Former's predicted prompts: token accuracy (agg_metrics) and token NLL.
Stage 1 / 2 configs set no valid split, as LAVIS's image_text_pretrain.
"""

import logging

import torch
import torch.distributed as dist
from lavis.common.dist_utils import is_dist_avail_and_initialized
from lavis.common.logger import MetricLogger
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask

from lavis_vpgtrans.common.dist import collective_device
from lavis_vpgtrans.tasks.captioning import VPGTransCaptionTask


class LossLoggingMixin:
    """Put first in the bases of a LAVIS task."""

    log_freq = 50

    @classmethod
    def setup_task(cls, **kwargs):
        task = cls()
        cfg = kwargs.get("cfg", None)
        if cfg is not None:
            task.log_freq = max(1, int(cfg.run_cfg.get("log_freq", cls.log_freq)))
        return task

    def train_step(self, model, samples):
        output = model(samples)
        losses = {k: v.item() for k, v in output.items()
                  if k.startswith("loss_") and torch.is_tensor(v) and v.numel() == 1}
        if getattr(self, "_loss_meters", None) is not None:
            self._pending_losses.append(losses)
        if samples.get("iters", 1) % self.log_freq == 0:
            logging.info("iter %s: %s", samples["iters"], "  ".join(f"{k}: {v:.6g}" for k, v in losses.items()))
        return output["loss"]

    def after_train_step(self, applied: bool):
        """Called by the training loop (common/train_loop.py) after each optimizer step: the loss
        terms of a skipped (non-finite) step stay out of the epoch's averages, as its loss does."""
        if getattr(self, "_loss_meters", None) is not None:
            if applied:
                for losses in self._pending_losses:
                    self._loss_meters.update(**losses)
            self._pending_losses = []

    def _train_inner_loop(self, **kwargs):
        self._loss_meters = MetricLogger(delimiter="  ")
        self._pending_losses = []
        try:
            stats = super()._train_inner_loop(**kwargs)
            self._loss_meters.synchronize_between_processes()
            # More digits than LAVIS's "{:.3f}": L_align and L_vocab are small numbers.
            stats.update({k: "{:.6g}".format(m.global_avg) for k, m in sorted(self._loss_meters.meters.items())})
            logging.info("Averaged losses: %s", {k: stats[k] for k in sorted(self._loss_meters.meters)})
        finally:
            self._loss_meters = None
        return stats


@registry.register_task("pformer_pretrain")
class PFormerPretrainTask(LossLoggingMixin, BaseTask):
    """P-Former stage 0, and BLIP-2 stages 1 / 2 with the alignment loss."""

    def valid_step(self, model, samples):
        if not hasattr(model, "reconstruction_counts"):
            raise TypeError(f"pformer_pretrain evaluates P-Former reconstruction; {type(model).__name__} "
                            f"has no reconstruction_counts (set no valid/test split for stage 1/2)")
        return [model.reconstruction_counts(samples)]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        totals = torch.tensor([[r["correct"], r["total"], r["nll"]] for r in val_result] or [[0.0, 0.0, 0.0]],
                              dtype=torch.float64).sum(0)
        if is_dist_avail_and_initialized():
            totals = totals.to(collective_device())
            dist.all_reduce(totals)
            totals = totals.cpu()
        correct, total, nll = totals.tolist()
        if total == 0:
            raise ValueError(f"split {split_name!r}: no tokens to evaluate")
        metrics = {"token_acc": correct / total, "token_nll": nll / total, "num_tokens": int(total)}
        metrics["agg_metrics"] = metrics["token_acc"]
        logging.info("%s (epoch %s): %s", split_name, epoch, metrics)
        return metrics


@registry.register_task("pformer_captioning")
class PFormerCaptionTask(LossLoggingMixin, VPGTransCaptionTask):
    """Stage 2 of the P-Former demo: `vpgtrans_captioning` (caption evaluation every epoch),
    logging loss_lm and loss_align on their own as well, so that the alignment's scale against
    the LM loss can be read from log.txt (train_loss_lm, train_loss_align)."""

    @classmethod
    def setup_task(cls, **kwargs):
        cfg = kwargs["cfg"]
        task = super(LossLoggingMixin, cls).setup_task(cfg=cfg)  # the caption task's settings
        task.log_freq = max(1, int(cfg.run_cfg.get("log_freq", cls.log_freq)))
        return task
