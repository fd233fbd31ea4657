"""Package discovery that pyproject.toml cannot express: the top-level conf/ ships as
cfexplain.conf, each config group folder (no ``__init__.py``) as one of its packages."""

from setuptools import find_namespace_packages, find_packages, setup

groups = [
    f"cfexplain.conf.{name}"
    for name in find_namespace_packages(where="conf", exclude=["__pycache__"])
]
setup(packages=[*find_packages(include=["cfexplain", "cfexplain.*"]), "cfexplain.conf", *groups])
