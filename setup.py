"""Package discovery for the one import namespace ``bft``: bft/ is ``bft``, and the top-level folders kernels/ and
trainer/ are mounted under it as ``bft.kernels`` and ``bft.trainer`` (the layout the project was asked for).

setuptools cannot discover packages through a ``package-dir`` that renames folders, so the names are listed here
from the tree instead of by hand: a new subpackage anywhere is picked up. Never install a top-level ``kernels``
module: Hugging Face ships a package of that name that transformers imports. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

MOUNTED = {"bft.kernels": "kernels", "bft.trainer": "trainer"}

packages = find_packages(include=["bft", "bft.*"])
package_dir = {"bft": "bft"}
for name, folder in MOUNTED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    package_dir[name] = folder

setup(packages=packages, package_dir=package_dir)
