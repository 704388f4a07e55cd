"""Evaluation tasks registered with LAVIS: vpgtrans_captioning, vpgtrans_vqa, vpgtrans_gqa."""

from lavis_vpgtrans.tasks.captioning import VPGTransCaptionTask
from lavis_vpgtrans.tasks.vqa import VPGTransGQATask, VPGTransVQATask

__all__ = ["VPGTransCaptionTask", "VPGTransVQATask", "VPGTransGQATask"]
