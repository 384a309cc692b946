"""The one compiled piece: the luks filter's sector loop (pynbd/formats/_sectors.c).

Everything else is in pyproject.toml. The extension is optional: where no C
compiler or Python headers are present the install still succeeds and
pynbd.formats.evp runs the same loop in Python.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pynbd.formats._sectors", ["src/pynbd/formats/_sectors.c"],
                             optional=True)])
