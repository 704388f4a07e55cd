"""Moved to lavis_vpgtrans.runners.launch (the entry points behind train.py and evaluate.py);
this name is kept for code that still imports it from here."""

from lavis_vpgtrans.runners.launch import DEFAULT_RUNNER, build, evaluate_main, train_main  # noqa: F401
