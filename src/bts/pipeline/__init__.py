"""``bts reproduce`` and what it writes: the profile's stages run as one resumable task graph, then
``results/<profile>/`` (metrics, claims, tables, figures), sweeps over it, and ``bts compare``.
"""
