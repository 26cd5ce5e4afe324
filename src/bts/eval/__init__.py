"""One evaluation suite for every method (docs/design.md §4).

Modules: ``interface`` (the ``LanguageModel`` protocol), ``perplexity`` (per-domain perplexity), ``metrics``
(math EM, chrF/BLEU, teacher-forced span EM, pass@k), ``humaneval`` (problems + sandboxed execution),
``generation`` (batch-1 generation with stop strings), ``config`` (``EvalConfig``), ``tasks`` (one module per task
family behind a registry: ``TaskInfo``, ``register``), ``suite`` (``evaluate``, ``TASKS``, ``DEFAULT_TASKS``),
``callbacks`` (``DownstreamEvalCallback``), ``harness`` (lm-eval adapter, registered as ``"bts"``),
``command`` (``bts eval``), ``testing`` (tiny tokenizer and synthetic records for tests).
"""
