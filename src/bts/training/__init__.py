"""The one training loop every trainable method shares, and what it measures.

* :mod:`bts.training.module` — ``LMTrainingModule``: loss, AdamW, schedule, validation, artifact;
* :mod:`bts.training.losses` — chunked linear cross-entropy over a large vocabulary;
* :mod:`bts.training.schedule` — warmup + cosine to 1 % (the paper's);
* :mod:`bts.training.perplexity` — per-domain held-out perplexity (torchmetrics);
* :mod:`bts.training.flops`, :mod:`bts.training.throughput` — model FLOPs per token, tokens/s and MFU;
* :mod:`bts.training.progress` — progress lines where no bar shows (logs, batch jobs).
"""
