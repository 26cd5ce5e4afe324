"""Machines without network: ``bts bundle`` gathers everything a profile needs (:mod:`bts.offline.bundle`), the
node side uses it (:mod:`bts.offline.node`); walk-through in docs/offline.md.
"""
