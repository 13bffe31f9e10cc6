"""Packages are found, never listed: a new module directory cannot be left out of the wheel.

Everything else is in pyproject.toml. The repository's profiles/ ship inside the wheel as
modelctl.profiles (package-dir there), so the embedded default profile works from any directory.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["modelctl", "modelctl.*", "servers", "servers.*"]), "modelctl.profiles", "modelctl.profiles.examples"]
)
