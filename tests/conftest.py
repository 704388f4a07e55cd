"""Shared fixtures: an offline environment and one toy zoo per test session."""

import atexit
import os
import shutil
import tempfile

import pytest

# Offline: every model and dataset comes from the toy zoo built below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Read when lavis_vpgtrans is imported: keep LAVIS's cache out of the user's home (and remove
# the one made here when the session ends).
if "LAVIS_CACHE_ROOT" not in os.environ:
    os.environ["LAVIS_CACHE_ROOT"] = tempfile.mkdtemp(prefix="lavis_cache_")
    atexit.register(shutil.rmtree, os.environ["LAVIS_CACHE_ROOT"], ignore_errors=True)

# Every torchrun the tests start (directly or through the recipe scripts) rendezvouses on a
# port the OS picks (torchrun reads PET_STANDALONE as --standalone): the default 29500, or any
# fixed port, would be shared by the two pytest-xdist workers and by other sessions.
os.environ.setdefault("PET_STANDALONE", "1")
# Under pytest-xdist (scripts/run_tests.sh runs two workers) one intra-op thread per worker,
# so that two workers do not oversubscribe the two cores.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def toy_zoo(tmp_path_factory):
    """Builds the toy zoo once (or reuses $VPGTRANS_TOY_ZOO) and points the plugin at it."""
    if os.environ.get("VPGTRANS_TOY_ZOO"):
        root = os.environ["VPGTRANS_TOY_ZOO"]
    elif XDIST_WORKER:
        # one zoo for all workers, next to their own temporary directories (ensure_zoo's
        # file lock lets one worker build it while the other waits)
        root = str(tmp_path_factory.getbasetemp().parent / "toy_zoo" / "zoo")
        os.makedirs(os.path.dirname(root), exist_ok=True)
    else:
        root = str(tmp_path_factory.mktemp("toy_zoo") / "zoo")
    os.environ["VPGTRANS_TOY_ZOO"] = root
    from lavis_vpgtrans.toy import zoo

    return zoo.ensure_zoo(root)


@pytest.fixture(scope="session")
def plugin(toy_zoo):
    """The plugin, with the toy world's builders registered (train.py registers them only
    for a config that names them)."""
    import lavis_vpgtrans
    import lavis_vpgtrans.toy.builders  # noqa: F401

    return lavis_vpgtrans


# The slowest test files, slowest first (measured in a two-worker run): pytest-xdist hands out
# files in collection order, so starting these first lets the two workers finish together
# instead of one of them starting a two-minute file at the end.
SLOW_FILES = ("test_demo.py", "test_pformer_reconstruction.py", "test_pformer_demo.py", "test_recipe_scripts.py",
              "test_nonfinite.py", "test_sharding.py", "test_own_data.py", "test_toy_determinism.py",
              "test_train_cli.py", "test_own_data_scripts.py", "test_run_record.py", "test_eval_configs.py",
              "test_own_data_formats.py", "test_recipe.py", "test_own_data_mixture.py", "test_pformer.py",
              "test_eval_metrics.py", "test_real_tokenizers.py", "test_lmms_eval.py", "test_vicuna_chat.py",
              "test_lora.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the order within a file and among the other files is kept
