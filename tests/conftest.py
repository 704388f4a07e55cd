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


@pytest.fixture(scope="session", autouse=True)
def toy_zoo(tmp_path_factory):
    """Builds the toy zoo once (or reuses $VPGTRANS_TOY_ZOO) and points the plugin at it."""
    root = os.environ.get("VPGTRANS_TOY_ZOO") or str(tmp_path_factory.mktemp("toy_zoo") / "zoo")
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
