"""Small helpers shared by the tests."""


def load_tiny(name, model_type, **overrides):
    """A registered model from its default yaml, with config overrides (e.g. train_vpg)."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cls = registry.get_model_class(name)
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path(model_type)).model, overrides)
    return cls.from_config(cfg)


def wait_for_tools_env(timeout: float = 900.0) -> None:
    """scripts/run_tests.sh builds .venv/tools (lmms-eval, img2dataset) while the suite runs and
    writes the build's exit status to $VPGTRANS_TOOLS_BUILD_STATUS when it ends: wait for it
    (nothing to wait for when the variable is unset). A failed build fails the test with its log."""
    import os
    import time

    import pytest

    status = os.environ.get("VPGTRANS_TOOLS_BUILD_STATUS")
    if not status:
        return
    deadline = time.monotonic() + timeout
    while not os.path.exists(status):
        if time.monotonic() > deadline:
            pytest.fail(f"the tools environment's build did not end within {timeout:.0f} s ({status})")
        time.sleep(2)
    with open(status) as f:
        code = f.read().strip()
    if code != "0":
        log = os.path.splitext(status)[0] + ".log"
        tail = open(log).read()[-3000:] if os.path.exists(log) else ""
        pytest.fail(f"scripts/setup_tools_env.sh failed (exit {code}):\n{tail}")
