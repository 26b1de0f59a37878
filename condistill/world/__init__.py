"""The embedded world: procedural scenes, the judge at inference and the ``synthetic:`` data source.

The training loop, ``load_adapter`` and the data layer never import this package at load time:
``open_source`` imports :mod:`condistill.world.source` by name when a spec starts with
``synthetic`` (``condistill.data.sources.PACKAGED_KINDS``), and ``condistill eval`` loads the judge.
"""
