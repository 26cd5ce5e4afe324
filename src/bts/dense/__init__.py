"""Dense causal LMs: the seed and the experts branched from it.

* :mod:`bts.dense.modeling` — the tiny Llama seed architecture, loading Hugging Face directories, the decoder
  parts that the stitched model and the upcycling baselines drive layer by layer;
* :mod:`bts.dense.module` — ``CausalLMModule``: seed pretraining and expert continued pretraining;
* :mod:`bts.dense.pinned` — committed, hash-pinned checkpoints (the tiny seed);
* :mod:`bts.dense.gguf_import` — ``bts import-gguf``: a GGUF checkpoint as a Hugging Face directory (SmolLM2).
"""
