"""python -m lavis_vpgtrans.plan --cfg-path CFG [--options ...] [--gpus N] [--gpu-gib G]"""

import sys

from lavis_vpgtrans.plan.report import main

sys.exit(main())
