"""Dataset builders registered with LAVIS."""

from lavis_vpgtrans.datasets import generic  # noqa: F401  registers own_caption / own_vqa
from lavis_vpgtrans.datasets import llava  # noqa: F401  registers own_instruct
