"""rotational: set whether the export says it is a spinning disk.

    pynbd serve --filter=rotational file disk.img                  # rotational
    pynbd serve --filter=rotational file disk.img rotational=false

Parameters
    rotational=BOOL   the NBD rotational flag advertised (default true): a
                      client may then order its requests (an elevator) to
                      save seeks. See the spinning filter to add seek delays.
"""

from __future__ import annotations

from ..backend import Filter, FilterConnection, Param


class RotationalConnection(FilterConnection["RotationalFilter"]):
    def is_rotational(self) -> bool:
        return self.filter.rotational


class RotationalFilter(Filter):
    short_requests = True
    name = "rotational"
    params = (Param("rotational", "bool", "advertise a rotational disk", default=True),)
    rotational: bool
    connection = RotationalConnection
