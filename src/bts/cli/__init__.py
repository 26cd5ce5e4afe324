"""The ``bts`` console script: one command table, errors handled in one place (:mod:`bts.cli.main`), the fast
check of Lightning command lines (:mod:`bts.cli.config_check`) and run roots (:mod:`bts.cli.run_dir`).
"""
