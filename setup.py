"""Package discovery that pyproject.toml cannot express: the top-level conf/ ships as cfexplain.conf."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["cfexplain", "cfexplain.*"]), "cfexplain.conf"])
