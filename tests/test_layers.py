"""Layers: the import contracts of .importlinter (layers, no import of the package root, no
cycles) hold, and import-linter sees them broken; the production package never imports the toy
world; "<scheme>:" paths and other packages' builders reach it only through the entry points
setup.py declares."""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "lavis_vpgtrans")
# The toy world and its own command line (the demo) may import it; nothing else may.
TOY_SIDE = ("toy", "demo")
TOY_CONFIG = os.path.join(REPO, "projects", "vpgtrans", "demo", "tiny_caption_opt.yaml")
CONTRACTS = os.path.join(REPO, ".importlinter")

FRESH_PROCESS = """
import json, sys
import lavis_vpgtrans, lavis_vpgtrans.models, lavis_vpgtrans.tasks, lavis_vpgtrans.runners, lavis_vpgtrans.datasets
import lavis_vpgtrans.export, lavis_vpgtrans.chat.session, lavis_vpgtrans.runners.launch
from lavis.common.registry import registry
toy_on_import = sorted(m for m in sys.modules if m.startswith("lavis_vpgtrans.toy"))
runner = lavis_vpgtrans.runners.launch.build(["--cfg-path", sys.argv[1], "--options", "run.output_dir=" + sys.argv[2],
                                              "run.job_id=layers"], "layers", evaluate=False)
print("RESULT", json.dumps({"toy_on_import": toy_on_import,
                            "toy_builders": [n for n in ("toy_caption", "toy_vqa") if registry.get_builder_class(n)],
                            "llm": runner.model.llm_model_name, "train": len(runner.datasets["toy_caption"]["train"])}))
"""


def toy_imports(path):
    """The lavis_vpgtrans.toy modules a source file imports (absolute or relative)."""
    package = os.path.relpath(os.path.dirname(path), REPO).replace(os.sep, ".")
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, `level - 1` packages up
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found += [n for n in names if n == "lavis_vpgtrans.toy" or n.startswith("lavis_vpgtrans.toy.")]
    return found


def test_no_production_module_imports_the_toy_package():
    offenders = {}
    for root, _, files in os.walk(PACKAGE):
        if os.path.relpath(root, PACKAGE).split(os.sep)[0] in TOY_SIDE:
            continue
        for name in files:
            if name.endswith(".py") and toy_imports(os.path.join(root, name)):
                offenders[os.path.relpath(os.path.join(root, name), REPO)] = toy_imports(os.path.join(root, name))
    assert offenders == {}
    # the scan itself finds such imports
    assert toy_imports(os.path.join(PACKAGE, "toy", "builders.py")) == [] and \
        toy_imports(os.path.join(PACKAGE, "toy", "zoo.py"))


def test_import_touches_no_toy_module_and_a_toy_config_still_runs(toy_zoo, tmp_path):
    """A fresh process: importing the package (and its subpackages) loads nothing of the toy
    world; building a run from a toy config the way train.py does loads its builders and
    resolves its toy: paths through the entry points."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VPGTRANS_TOY_ZOO": toy_zoo}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, TOY_CONFIG, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["toy_on_import"] == []
    assert result["toy_builders"] == ["toy_caption", "toy_vqa"]
    assert result["llm"] == "toy:opt-small" and result["train"] > 0


def test_path_values_pass_through_unless_they_name_a_scheme(plugin, toy_zoo, tmp_path, monkeypatch):
    from lavis_vpgtrans.common.paths import UnknownSchemeError, known_schemes, resolve_path

    for value in ("/models/opt-6.7b", "facebook/opt-2.7b", "relative/ckpt.pth", "C:\\models\\vit", "C:/x.pth",
                  "https://thunlp.oss-cn-qingdao.aliyuncs.com/vpgtrans/vl-vicuna.pth", "s3://bucket/x.pth", None, 3):
        assert resolve_path(value) == value
    literal = tmp_path / "run:1.pth"  # an existing file is never taken for a scheme
    literal.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert resolve_path("run:1.pth") == "run:1.pth"
    assert resolve_path("toy:opt-small") == os.path.join(toy_zoo, "opt-small")
    assert "toy" in known_schemes()
    with pytest.raises(UnknownSchemeError, match=r"'hf:facebook/opt-2\.7b': unknown path scheme 'hf'; known "
                                              r"schemes: toy \(registered as 'lavis_vpgtrans.path_schemes'"):
        resolve_path("hf:facebook/opt-2.7b")


def test_an_unknown_scheme_in_a_config_path_names_the_value(plugin):
    from helpers import load_tiny

    from lavis_vpgtrans.common.paths import UnknownSchemeError

    with pytest.raises(UnknownSchemeError, match="'zoo:opt-small': unknown path scheme 'zoo'"):
        load_tiny("blip2_opt_transfer", "tiny_opt_small", llm_model="zoo:opt-small")


def lint_imports(root):
    """import-linter's `lint-imports` on the lavis_vpgtrans package under `root` (the contracts of
    this repository's .importlinter): (exit status, output)."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache", "--no-logo", CONTRACTS],
                          cwd=root, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_import_contracts_are_kept():
    status, output = lint_imports(REPO)
    assert status == 0, output
    assert "Contracts: 3 kept, 0 broken." in output


# (module added to a copy of the package, its source, what import-linter must report)
BREAKS = {
    "upward": ("common/upward.py", "from lavis_vpgtrans.runners import launch\n",
               "lavis_vpgtrans.common is not allowed to import lavis_vpgtrans.runners:\n\n"
               "- lavis_vpgtrans.common.upward -> lavis_vpgtrans.runners.launch (l.1)"),
    "sideways": ("chat/sideways.py", "def f():\n    from lavis_vpgtrans import export\n",
                 "lavis_vpgtrans.chat is not allowed to import lavis_vpgtrans.export:\n\n"
                 "- lavis_vpgtrans.chat.sideways -> lavis_vpgtrans.export (l.2)"),
    "root": ("models/rooted.py", "import lavis_vpgtrans\n",
             "lavis_vpgtrans.models.rooted is not allowed to import lavis_vpgtrans:"),
    "cycle": ("common/paths_b.py", "from lavis_vpgtrans.common import checkpoint\n",
              "No cycles are allowed in lavis_vpgtrans.common."),
    "unplaced": ("extra/__init__.py", "", "The following modules are not listed as layers:\n\n- lavis_vpgtrans.extra"),
}


@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_import_linter_fails_on_a_broken_contract(tmp_path, kind):
    """A copy of the package with one bad import added: an import up a layer (inside a function
    too), between independent packages, of the package root, a cycle (common.checkpoint imports
    the new module back), a package no layer names."""
    path, source, message = BREAKS[kind]
    shutil.copytree(PACKAGE, tmp_path / "lavis_vpgtrans", ignore=shutil.ignore_patterns("__pycache__"))
    os.makedirs(os.path.dirname(tmp_path / "lavis_vpgtrans" / path), exist_ok=True)
    (tmp_path / "lavis_vpgtrans" / path).write_text(source)
    if kind == "cycle":
        with open(tmp_path / "lavis_vpgtrans" / "common" / "checkpoint.py", "a") as f:
            f.write("\nfrom lavis_vpgtrans.common import paths_b  # noqa: E402\n")
    status, output = lint_imports(tmp_path)
    assert status != 0, output
    assert message in output, output
    assert "0 broken" not in output
