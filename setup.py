from setuptools import find_packages, setup

# Dependencies live in requirements.txt: salesforce-lavis 1.0.2 must be installed with
# --no-deps next to a newer transformers (see scripts/setup_env.sh), which pip metadata
# cannot express, so the package itself declares none.
setup(
    name="lavis-vpgtrans",
    version="0.1.0",
    description="VPGTrans (transfer a visual prompt generator across LLMs) and P-Former as a LAVIS plugin",
    packages=find_packages(include=["lavis_vpgtrans", "lavis_vpgtrans.*"]),
    package_data={"lavis_vpgtrans": ["**/*.yaml"]},
    python_requires=">=3.10",
    # lmms-eval goes in its own environment layered over .venv: scripts/setup_tools_env.sh says why
    extras_require={"lmms-eval": ["lmms-eval==0.7.3"]},
    entry_points={
        # "toy:<path>" in configs: the offline toy zoo (common/paths.py loads it on first use)
        "lavis_vpgtrans.path_schemes": ["toy = lavis_vpgtrans.toy.zoo:resolve"],
        # builders registered when a config names them (runners/launch.py), not on import
        "lavis_vpgtrans.builders": ["toy_caption = lavis_vpgtrans.toy.builders:ToyCaptionBuilder",
                                    "toy_vqa = lavis_vpgtrans.toy.builders:ToyVQABuilder"],
        # our models in lmms-eval (`--model vpgtrans_opt` etc.): lavis_vpgtrans/lmms/
        "lmms_eval.models": ["lavis_vpgtrans = lavis_vpgtrans.lmms:manifests"],
    },
)
