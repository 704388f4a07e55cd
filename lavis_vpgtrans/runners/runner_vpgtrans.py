"""The VPGTrans recipe in one launch (paper section 3):

  stage 1, projector warm-up: epochs [0, warmup_epochs). The inherited VPG and the LLM are
      frozen; only the projector (initialised by the word-embedding converter) trains, at a
      constant lr = warmup_lr_scale x init_lr (5x in the paper; 10x also converges, the VPG
      itself diverges at 5x, which is why it stays frozen here).
  stage 2, direct fine-tuning: epochs [warmup_epochs, max_epoch). VPG (Q-Former, query
      tokens, ln_vision) and projector train jointly with the normal schedule (lr_sched,
      e.g. linear warm-up to init_lr then cosine to min_lr), counted from the stage's start.

At the switch the trainable set changes, so the optimizer and the lr scheduler are rebuilt and
the model set up again (model_setup.py: a new DDP wrapper). Checkpoints carry their stage; resuming enters that stage first.
With warmup_epochs: 0 the runner is plain stage-2 training (the train-from-scratch and
VPG-inherit baselines); with warmup_epochs = max_epoch it is stage 1 alone. metrics.jsonl
records each epoch's stage; the paper's epoch count (the whole stage 1 is epoch 1, and a
stage-2 run whose projector_checkpoint comes from a stage-1 run starts at epoch 2) is derived
from the run's config by lavis_vpgtrans.analysis.speedup.
"""

import logging

from lavis.common.registry import registry

from lavis_vpgtrans.runners.runner_base import PortableRunner


class ConstantLR:
    """A constant learning rate, in LAVIS's scheduler interface."""

    def __init__(self, optimizer, lr):
        self.optimizer, self.lr = optimizer, lr

    def step(self, cur_epoch, cur_step):
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr


class EpochOffset:
    """Runs a LAVIS lr scheduler on epochs counted from the start of stage 2, so its warm-up
    happens in stage 2's first epoch and its cosine ends with the run."""

    def __init__(self, scheduler, offset):
        self.scheduler, self.offset = scheduler, offset

    def step(self, cur_epoch, cur_step):
        self.scheduler.step(cur_epoch=cur_epoch - self.offset, cur_step=cur_step)


@registry.register_runner("runner_vpgtrans")
class VPGTransRunner(PortableRunner):
    def __init__(self, cfg, task, model, datasets, job_id):
        if not hasattr(model, "set_trainable"):
            raise TypeError(f"runner_vpgtrans needs a model with set_trainable(train_vpg) "
                            f"(the lavis_vpgtrans VL-LLMs); got {type(model).__name__}")
        super().__init__(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id)
        if not 0 <= self.warmup_epochs <= self.max_epoch:
            raise ValueError(f"run.warmup_epochs={self.warmup_epochs} must be in [0, max_epoch={self.max_epoch}]")
        self.stage = None

    @staticmethod
    def warmup_epochs_in(run_cfg) -> int:
        """The stage-1 epochs of a run with this `run` config (also read by the analysis)."""
        return int(run_cfg.get("warmup_epochs", 1))

    @property
    def warmup_epochs(self) -> int:
        return self.warmup_epochs_in(self.config.run_cfg)

    @property
    def warmup_lr_scale(self) -> float:
        return float(self.config.run_cfg.get("warmup_lr_scale", 5.0))

    def stage_of(self, epoch) -> int:
        return 1 if epoch < self.warmup_epochs else 2

    def epoch_record(self, epoch) -> dict:
        return {"stage": self.stage_of(epoch)}  # resume enters the checkpoint's stage

    def enter_stage(self, stage: int) -> None:
        if stage == self.stage:
            return
        self._model.set_trainable(train_vpg=(stage == 2))
        # a new trainable set: new optimizer and schedule, the model set up for it (DDP)
        self._optimizer, self._lr_sched = None, None
        self.prepare_model()
        self.stage = stage
        trainable = sum(p.numel() for p in self._model.parameters() if p.requires_grad)
        logging.info("VPGTrans stage %d: %s train (%d parameters)", stage,
                     "projector only" if stage == 1 else "VPG and projector", trainable)

    def checkpoint_also_saves(self) -> frozenset:
        """A stage-1 checkpoint holds the inherited VPG besides the projector: with the stage-2
        model's trainable set, checkpoint_best.pth of a run whose best epoch is in stage 1 loads for
        the run's final test and for evaluate.py (the projector alone would meet a VPG that stage 2
        has changed since, or lack the keys a train_vpg model requires)."""
        if self.stage != 1:
            return frozenset()
        model = self._model
        model.set_trainable(train_vpg=True)
        names = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
        model.set_trainable(train_vpg=False)
        return names

    def train_epoch(self, epoch):
        self.enter_stage(self.stage_of(epoch))
        return super().train_epoch(epoch)

    def prepare_resume(self, checkpoint):
        stage = checkpoint.get("stage", None)
        if stage not in (1, 2):
            raise KeyError(f"resume checkpoint has no VPGTrans stage (got {stage!r})")
        self.enter_stage(stage)

    @property
    def lr_scheduler(self):
        if self._lr_sched is None:
            run_cfg = self.config.run_cfg
            if self.stage == 1:
                self._lr_sched = ConstantLR(self.optimizer, self.warmup_lr_scale * self.init_lr)
            else:
                sched_cls = registry.get_lr_scheduler_class(run_cfg.lr_sched)
                self._lr_sched = EpochOffset(sched_cls(
                    optimizer=self.optimizer, max_epoch=self.max_epoch - self.warmup_epochs,
                    min_lr=self.min_lr, init_lr=self.init_lr,
                    decay_rate=run_cfg.get("lr_decay_rate", None),
                    warmup_start_lr=run_cfg.get("warmup_lr", -1),
                    warmup_steps=run_cfg.get("warmup_steps", 0)), offset=self.warmup_epochs)
        return self._lr_sched
