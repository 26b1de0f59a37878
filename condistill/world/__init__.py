"""The embedded world: procedural scenes, the judge at inference and the ``synthetic:`` data source.

The library proper never imports this package; the data layer finds the ``synthetic`` source
through the ``condistill.data_sources`` entry point that this package declares.
"""
