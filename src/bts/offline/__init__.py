"""Machines without network: ``bts bundle`` gathers everything a profile needs (:mod:`bts.offline.bundle`, its
dependency wheels :mod:`bts.offline.wheels`), the node side uses it (:mod:`bts.offline.node`); walk-through in
docs/offline.md.
"""
