"""Modules that let code written for other tools run under pynbd unchanged.

``pynbd.compat.nbdkit`` is the ``nbdkit`` module that nbdkit Python plugins
import (see ``pynbd serve python --help``).
"""
