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
)
