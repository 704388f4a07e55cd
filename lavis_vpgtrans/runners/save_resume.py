"""Save and resume of PortableRunner (runner_base.py), under LAVIS 1.0.2's method names
(`_save_checkpoint`, `_load_checkpoint`, `_reload_best_model`).

A checkpoint holds the trainable parameters only (full tensors, also from a sharded model: no
frozen ViT / LLM, no buffers, no tied copies), the optimizer's state, the scaler, the epoch,
what a subclass records about it (`epoch_record`: runner_vpgtrans's stage) and the loop's state
(run id, whether the epoch was validated, the best score so far). Rank 0 writes it atomically
(common/checkpoint.py). Weights load by the one set of rules of
common/checkpoint.load_trained_state, into a sharded model or not.

Nothing non-finite is written or resumed: a checkpoint with NaN or inf is not written (every rank
stops; checkpoint_best.pth and the last checkpoint_N.pth keep their good content), and one read
for resuming is refused naming the first bad key (common/checkpoint.check_finite_state).

Resuming restores all of it: the run continues as one run (same run id in metrics.jsonl, same
best checkpoint), and an epoch whose validation did not finish is validated again.
"""

import logging
import math
import os

from lavis.common.dist_utils import is_main_process

from lavis_vpgtrans.common import sharding
from lavis_vpgtrans.common.checkpoint import (NonFiniteCheckpointError, check_finite_state, load_checkpoint_file,
                                              load_trained_state, save_checkpoint_atomic, trainable_state)
from lavis_vpgtrans.common.dist import from_rank0
from lavis_vpgtrans.runners.run_record import METRICS_FILE, RunDirError, run_ids_in


class SaveResume:
    """Checkpoints of a PortableRunner: a mixin over LAVIS's RunnerBase."""

    def trainable_state_dict(self):
        """Trainable parameters only: no frozen ViT / LLM, no buffers, no tied copies. Full
        tensors also when sharded (gathered: then every rank must call this)."""
        model = self.unwrap_dist_model(self.model)
        also = self.checkpoint_also_saves()
        if sharding.is_sharded(model):
            return sharding.full_trainable_state(model, also)
        state = {n: v.cpu() for n, v in trainable_state(model).items()}
        state.update({n: p.detach().cpu() for n, p in model.named_parameters() if n in also and n not in state})
        return state

    def checkpoint_also_saves(self) -> frozenset:
        """Hook: names of frozen parameters a checkpoint holds as well (runner_vpgtrans: in stage 1,
        the VPG that stage 2 trains, so that every checkpoint of the run loads as a whole model)."""
        return frozenset()

    def optimizer_state_dict(self):
        """The optimizer's state; when sharded, with full tensors keyed by parameter name (gathered on
        rank 0: every rank must call this)."""
        model = self.unwrap_dist_model(self.model)
        if sharding.is_sharded(model):
            return sharding.full_optimizer_state(model, self.optimizer)
        return self.optimizer.state_dict()

    def _save_checkpoint(self, cur_epoch, is_best=False, validated=False):
        """Written by rank 0, atomically; every rank calls it (a sharded model is gathered first).
        A checkpoint with NaN or inf is not written (the file keeps the last good one) and every
        rank stops on it."""
        refused = from_rank0(self._write_checkpoint(cur_epoch, is_best, validated))
        if refused:
            raise NonFiniteCheckpointError(refused)

    def _write_checkpoint(self, cur_epoch, is_best, validated):
        """Rank 0 writes; the error of a refused (non-finite) checkpoint, else None."""
        sharded = sharding.is_sharded(self.unwrap_dist_model(self.model))
        if not (sharded or is_main_process()):
            return None
        model_state, optimizer_state = self.trainable_state_dict(), self.optimizer_state_dict()
        if not is_main_process():
            return None
        save_obj = {
            "model": model_state,
            "optimizer": optimizer_state,
            "optimizer_layout": "full_state_dict" if sharded else "torch",
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
            **self.epoch_record(cur_epoch),
            "iters": (cur_epoch + 1) * (self.iters_per_inner_epoch or len(self.train_loader)),
            "loop": {"run_id": self.run_id, "validated": bool(validated), "best_epoch": self.best_epoch,
                     "best_agg_metric": None if self.best_agg_metric == -math.inf else float(self.best_agg_metric)},
        }
        save_to = os.path.join(self.output_dir, "checkpoint_{}.pth".format("best" if is_best else cur_epoch))
        logging.info("Saving checkpoint at epoch %s to %s.", cur_epoch, save_to)
        try:
            save_checkpoint_atomic(save_obj, save_to)
        except NonFiniteCheckpointError as e:
            return str(e)
        return None

    def prepare_resume(self, checkpoint):
        """Hook: put the runner in the checkpoint's state before its weights are loaded."""

    def _reload_best_model(self, model):
        checkpoint_path = os.path.join(self.output_dir, "checkpoint_best.pth")
        logging.info("Loading checkpoint from %s.", checkpoint_path)
        load_trained_state(model, load_checkpoint_file(checkpoint_path)["model"], checkpoint_path)
        return model

    def _load_checkpoint(self, url_or_filename) -> bool:
        """Resume: model (trainable part), optimizer, scaler, epoch and the loop's state (run id,
        best score, whether the epoch was validated). Returns True when the checkpoint's epoch
        must be validated again (its validation did not finish)."""
        checkpoint = load_checkpoint_file(url_or_filename)
        check_finite_state({k: checkpoint.get(k) for k in ("model", "optimizer", "scaler")}, url_or_filename)
        self.prepare_resume(checkpoint)
        model = self.unwrap_dist_model(self.model)
        load_trained_state(model, checkpoint["model"], url_or_filename)
        layout = checkpoint.get("optimizer_layout", "torch")
        if layout != ("full_state_dict" if sharding.is_sharded(model) else "torch"):
            was = "with" if layout == "full_state_dict" else "without"
            raise ValueError(f"{url_or_filename}: its optimizer state was saved {was} run.fsdp; resume it {was} "
                             f"run.fsdp (its weights load either way, e.g. as vpg_checkpoint / projector_checkpoint)")
        if layout == "full_state_dict":
            sharding.load_full_optimizer_state(model, self.optimizer, checkpoint["optimizer"])
        else:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.resumed_epoch = int(checkpoint["epoch"])
        loop = checkpoint.get("loop", None)
        if loop is None:
            logging.warning("%s predates the loop state in checkpoints: its best score is unknown, so the "
                            "first epoch after resuming becomes checkpoint_best.pth", url_or_filename)
            revalidate = False
        else:
            self.run_id = loop["run_id"]
            self.best_epoch = int(loop["best_epoch"])
            best = loop["best_agg_metric"]
            self.best_agg_metric = -math.inf if best is None else float(best)
            revalidate = not loop["validated"] and self.validates
        self.start_epoch = self.resumed_epoch + (0 if revalidate else 1)
        self._check_metrics_run_id()
        logging.info("Resume checkpoint from %s (run %s, epoch %d%s; best %s at epoch %d)", url_or_filename,
                     self.run_id, self.resumed_epoch, ", to validate again" if revalidate else "",
                     self.best_agg_metric, self.best_epoch)
        return revalidate

    def _check_metrics_run_id(self):
        """A resumed run appends to metrics.jsonl only where it holds this run's records
        (checked by rank 0, which writes it; every rank raises)."""
        error = None
        if is_main_process():
            path = os.path.join(self.output_dir, METRICS_FILE)
            others = [i for i in run_ids_in(path) if i != self.run_id]
            if others:
                error = (f"{path} holds run(s) {', '.join(others) or '(no run id)'}, but the checkpoint resumed "
                         f"is run {self.run_id}: resume into another run.output_dir or run.job_id")
        error = from_rank0(error)
        if error:
            raise RunDirError(error)

    def _check_resume_fits(self):
        if self.resumed_epoch >= self.max_epoch:
            raise ValueError(f"run.resume_ckpt_path={self.resume_ckpt_path} is epoch {self.resumed_epoch} "
                             f"(0-based) but run.max_epoch={self.max_epoch}: there is nothing to train; "
                             f"raise run.max_epoch to continue the run")
        if self.start_epoch >= self.max_epoch:
            logging.warning("the resumed checkpoint is the last epoch (run.max_epoch=%d), already validated: "
                            "nothing to train, only the test splits run", self.max_epoch)
