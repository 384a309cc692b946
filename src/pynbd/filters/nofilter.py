"""nofilter: a filter that passes every request through unchanged.

    pynbd serve --filter=nofilter memory 1G

It takes no parameters. It is useful for testing the stack (a filter that
changes nothing must cost nothing: every call reaches the layer below
directly) and as a placeholder in scripts that always name a filter.
"""

from __future__ import annotations

from ..backend import Filter


class NofilterFilter(Filter):
    short_requests = True
    name = "nofilter"
