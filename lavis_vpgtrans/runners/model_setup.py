"""The model a run trains, set up in one explicit step (`prepare_model`), run when the runner is
built and again when a stage switch changes what trains (runner_vpgtrans.py):

    activation checkpointing   run.activation_checkpointing (common/sharding.py), applied once
    -> sharding                run.fsdp: FSDP2 over the run's processes, once (a stage switch
                               changes which parameters train, not the sharding); the ranks but 0
                               built the LLM without weights (launch.py) and get them from rank 0
    -> device                  run.device
    -> DDP                     when distributed and not sharded: a new wrapper each time, as DDP
                               reduces the gradients of the parameters that train when it wraps

`model` is the prepared model (LAVIS's getter moved it to its device and wrapped it on first use;
with `device: cpu` it returned None). An evaluation leaves a sharded model's root unit gathered
(a forward without backward): `reshard_after_evaluation` puts back the sharded parameters the
optimizer holds.
"""

import logging

from lavis.common.dist_utils import get_world_size
from torch.nn.parallel import DistributedDataParallel as DDP

from lavis_vpgtrans.common import sharding


class ModelSetup:
    """The model setup of PortableRunner (runner_base.py), a mixin over LAVIS's RunnerBase, whose
    `_model` (the model as built) and `_wrapped_model` (what trains) it sets."""

    _checkpointing_applied = False
    _setup_logged = False

    @property
    def sharding_config(self):
        """`run.fsdp` (common/sharding.py), or None: plain DDP."""
        return sharding.ShardingConfig.parse(self.config.run_cfg.get("fsdp", None))

    @property
    def checkpointing_config(self):
        """`run.activation_checkpointing` (common/sharding.py), or None."""
        return sharding.CheckpointingConfig.parse(self.config.run_cfg.get("activation_checkpointing", None))

    def prepare_model(self) -> None:
        """Activation checkpointing -> sharding -> device -> DDP (see the module's doc)."""
        model = self._model
        if self.checkpointing_config is not None and not self._checkpointing_applied:
            sharding.apply_activation_checkpointing(model, self.checkpointing_config)
            self._checkpointing_applied = True
            logging.info("run.activation_checkpointing: %s", self.checkpointing_config)
        if self.sharding_config is not None and not sharding.is_sharded(model):
            if not self.use_distributed:
                raise ValueError("run.fsdp shards the model over the processes of a distributed run: "
                                 "launch with torchrun (or remove run.fsdp)")
            from torch.distributed.device_mesh import init_device_mesh

            # sharded where it sits, then moved: a rank never holds the whole LLM on its device
            mesh = init_device_mesh(self.device.type, (get_world_size(),))
            sharding.shard_model(model, self.sharding_config, mesh=mesh)
            logging.info("run.fsdp: %s", self.sharding_config)
        llm = getattr(model, "llm_model", None)
        if not sharding.is_sharded(model) and llm is not None and sharding.has_meta_weights(llm):
            raise ValueError("the LLM was built without its weights (sharding.llm_weights_from_rank0, for run.fsdp "
                             "with shard_llm) but the model is not sharded: build it outside that context")
        if model.device != self.device:
            model = self._model = model.to(self.device)
        if sharding.is_sharded(model):
            self._wrapped_model = sharding.resharded(model)  # FSDP reduce-scatters the gradients itself
        elif self.use_distributed:
            self._wrapped_model = DDP(model, device_ids=[self.config.run_cfg.gpu] if self.cuda_enabled else None)
        else:
            self._wrapped_model = model
        if not self._setup_logged and hasattr(model, "llm_model"):
            logging.info("this rank holds %d bytes of the LLM's weights and buffers",
                         sharding.local_bytes(model.llm_model))
        self._setup_logged = True

    @property
    def model(self):
        """The prepared model: wrapped in DDP, sharded in place, or the model itself."""
        return self._wrapped_model

    def unwrap_dist_model(self, model):
        return model.module if isinstance(model, DDP) else model

    def reshard_after_evaluation(self) -> None:
        """A sharded model's parameters back in their sharded form after a forward without backward
        (the root unit stays gathered then, and its parameters are not the ones the optimizer holds)."""
        model = self.unwrap_dist_model(self._wrapped_model)
        if sharding.is_sharded(model):
            sharding.resharded(model)
