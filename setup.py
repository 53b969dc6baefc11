"""Package layout that pyproject.toml cannot express: two top-level folders shipped as package data.

``data_manifests/`` (the dataset catalogue) and the dashboard notebook of ``notebooks/`` stay at the top
level of the repository, where people look for them, and are mapped into the wheel as
``cxrbench/data/data_manifests/`` and ``cxrbench/app/notebooks/`` (read with ``importlib.resources``).
Everything else is configured in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

SHIPPED_FOLDERS = {"cxrbench.data.data_manifests": "data_manifests", "cxrbench.app.notebooks": "notebooks"}

setup(
    packages=[*find_namespace_packages(include=["cxrbench*"]), *SHIPPED_FOLDERS],
    package_dir=SHIPPED_FOLDERS,
)
