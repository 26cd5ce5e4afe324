"""What every layer shares: files, hashes and errors (:mod:`bts.core.io`), the ``LanguageModel`` interface that
every method implements (:mod:`bts.core.language_model`), parameter accounting (:mod:`bts.core.params`), the
transformers 5.x adapter (:mod:`bts.core.hf_compat`, :mod:`bts.core.hub_kernels`), quiet logging
(:mod:`bts.core.quiet`). Imports nothing else of ``bts``.
"""
