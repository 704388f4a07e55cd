"""Tasks registered with LAVIS: the evaluation tasks vpgtrans_captioning, vpgtrans_vqa,
vpgtrans_gqa, and pformer_pretrain (P-Former stage 0, BLIP-2 stages 1 / 2 with alignment).

Tasks reach the datasets they evaluate through LAVIS's registry, never by import: the package's
__init__ (run before any of its modules) registers the benchmark builders (vpgtrans_coco_caption,
vpgtrans_nocaps, vpgtrans_vqav2, vpgtrans_okvqa, vpgtrans_gqa).
"""

from lavis_vpgtrans.tasks.captioning import VPGTransCaptionTask
from lavis_vpgtrans.tasks.pformer import PFormerPretrainTask
from lavis_vpgtrans.tasks.vqa import VPGTransGQATask, VPGTransVQATask

__all__ = ["VPGTransCaptionTask", "VPGTransVQATask", "VPGTransGQATask", "PFormerPretrainTask"]
