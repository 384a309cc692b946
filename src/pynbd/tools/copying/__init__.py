"""The pieces of ``pynbd copy``: options, endpoints, the plan, the engine, progress."""
