"""``bts reproduce`` and what it writes: the profile's stages run as one resumable task graph, then
``results/<profile>/`` (metrics, claims, tables, figures), sweeps over it, and ``bts compare``.

``bts reproduce`` in parts: ``command`` (the command), ``profile`` (the profile's schema, checked at load), ``run``
(one seed's ``Pipeline``), ``state`` (its stage records), ``stages`` (the stage kinds), ``scheduler`` (the parallel
task graph), ``summary`` (``metrics.json``), ``report`` and ``figures_results`` (tables and figures).
"""
