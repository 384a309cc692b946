"""The pieces of ``pynbd fuse``: the exports as files (``files``) and the FUSE glue (``mount``)."""
