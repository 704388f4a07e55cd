"""lavis-vpgtrans: VPGTrans and P-Former as a LAVIS plugin.

Importing this package imports LAVIS (and the parts `import lavis` leaves out: runners and
lr schedulers), repoints LAVIS's cache root away from /export/..., and registers this
plugin's models, builders, tasks and runners in LAVIS's registry.
"""

import gc
import os

# Importing LAVIS creates millions of long-lived objects (torch, transformers, spaCy, ...). The
# cyclic collector would scan them again and again while they load, and once more at exit:
# seconds per process (train.py, the CLIs, every torchrun worker). Collect nothing while
# importing; then gc.freeze() moves everything alive out of the collector's sight for good
# (objects created later are collected as usual).
_collecting = gc.isenabled()
gc.disable()
try:
    import lavis  # noqa: F401,E402  registers LAVIS's models, builders, processors and tasks
    import lavis.common.optims  # noqa: F401,E402  registers the lr schedulers
    import lavis.runners  # noqa: F401,E402  registers runner_base / runner_iter
    from lavis.common.registry import registry  # noqa: E402

    # LAVIS 1.0.2 registers <site-packages>/../export/home/.cache/lavis as cache_root.
    if "/export/" in registry.get_path("cache_root"):
        registry.mapping["paths"]["cache_root"] = os.environ.get(
            "LAVIS_CACHE_ROOT", os.path.join(os.path.expanduser("~"), ".cache", "lavis"))

    from lavis_vpgtrans.datasets import benchmarks, builders, minigpt4, sentences  # noqa: E402,F401
    from lavis_vpgtrans import models  # noqa: E402,F401
    from lavis_vpgtrans.models import blip2_qformer_pformer, pformer  # noqa: E402,F401
    from lavis_vpgtrans import tasks  # noqa: E402,F401
    from lavis_vpgtrans.runners import runner_base, runner_vpgtrans  # noqa: E402,F401
    from lavis_vpgtrans.common import kernels, lavis_fixes  # noqa: E402

    lavis_fixes.apply()
    if os.environ.get(kernels.PIN_FLAG) == "1":  # started with kernels.pinned_env()
        kernels.apply_in_process()
    gc.freeze()
finally:
    if _collecting:
        gc.enable()

