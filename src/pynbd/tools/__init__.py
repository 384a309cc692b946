"""Command-line tools: ``pynbd TOOL`` runs ``pynbd.tools.TOOL.main``."""
