"""LAVIS 1.0.2's inner training loop (BaseTask._train_inner_loop) with the non-finite check.

LAVIS applied every step, whatever its loss: a NaN loss trained NaN weights for the rest of the
run, and they were saved as the best checkpoint. Here each optimizer step is checked first
(common/finite.py's NonFiniteGuard): a step whose loss or gradients are non-finite on any rank
is skipped on every rank, and `run.max_nonfinite_steps` skipped steps in a row stop the run
with a NonFiniteLossError naming them. Everything else is LAVIS's loop unchanged: the lr
schedule, autocast and GradScaler, gradient accumulation, the logged stats -- except that a
skipped step's loss is left out of the epoch's average loss (its warning names it; an epoch
without an applied step has no train_loss), and a task's `after_train_step(applied)` is called
after each optimizer step (tasks/pformer.py logs its loss terms of applied steps only).

lavis_fixes.apply() installs it as BaseTask._train_inner_loop, so every task trains through
it (LAVIS's own, e.g. image_text_pretrain, and ours).
"""

import contextlib
import logging

import torch
from lavis.common.logger import MetricLogger, SmoothedValue
from lavis.datasets.data_utils import prepare_sample

from lavis_vpgtrans.common.finite import guard_of


def guarded_inner_loop(self, epoch, iters_per_epoch, model, data_loader, optimizer, lr_scheduler,
                       scaler=None, start_iters=None, log_freq=50, cuda_enabled=False, accum_grad_iters=1):
    """BaseTask._train_inner_loop of LAVIS 1.0.2, each optimizer step checked (see module doc)."""
    guard = guard_of(self)
    use_amp = scaler is not None

    if not hasattr(data_loader, "__next__"):
        data_loader = iter(data_loader)

    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    pending_losses = []  # the loss values of the accumulation window, logged once its step is applied

    logging.info("Start training epoch {}, {} iters per inner epoch.".format(epoch, iters_per_epoch))
    header = "Train: data epoch: [{}]".format(epoch)
    if start_iters is None:  # epoch-based runner
        inner_epoch = epoch
        first_step = epoch * iters_per_epoch
    else:  # iteration-based: the lr follows the iterations
        inner_epoch = start_iters // iters_per_epoch
        first_step = start_iters
        header = header + "; inner epoch [{}]".format(inner_epoch)

    for i in metric_logger.log_every(range(iters_per_epoch), log_freq, header):
        if i >= iters_per_epoch:
            break
        samples = next(data_loader)
        samples = prepare_sample(samples, cuda_enabled=cuda_enabled)
        samples.update({"epoch": inner_epoch, "num_iters_per_epoch": iters_per_epoch, "iters": i})

        lr_scheduler.step(cur_epoch=inner_epoch, cur_step=i)

        with torch.autocast("cuda") if use_amp else contextlib.nullcontext():
            loss = self.train_step(model=model, samples=samples)

        if use_amp:
            scaler.scale(loss).backward()
        else:
            loss.backward()

        at_step = (i + 1) % accum_grad_iters == 0
        # the one host read of the step (LAVIS's loss.item()), carrying every rank's flag
        loss_value, bad_ranks, local = guard.read(loss, optimizer, scaler if use_amp else None, at_step=at_step)
        if at_step:
            if not bad_ranks:
                if use_amp:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                guard.applied()
                if "loss" not in metric_logger.meters:  # (an empty meter cannot be printed)
                    metric_logger.add_meter("loss", SmoothedValue(window_size=1, fmt="{value:.4f}"))
                for value in pending_losses + [loss_value]:
                    metric_logger.update(loss=value)
            else:
                if use_amp:
                    scaler.update()  # lowers the loss scale after an overflow, as a skipped amp step does
                guard.skipped(step=first_step + i, epoch=epoch, iteration=i, iters_per_epoch=iters_per_epoch,
                              bad_ranks=bad_ranks, local=local, model=model, samples=samples, use_amp=use_amp,
                              scaler=scaler if use_amp else None)
            optimizer.zero_grad()
            pending_losses = []
            after_step = getattr(self, "after_train_step", None)  # tasks.pformer.LossLoggingMixin
            if after_step is not None:
                after_step(applied=not bad_ranks)
        else:
            pending_losses.append(loss_value)
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])

    metric_logger.synchronize_between_processes()
    logging.info("Averaged stats: " + str(metric_logger.global_avg()))
    return {k: "{:.3f}".format(meter.global_avg) for k, meter in metric_logger.meters.items()}
