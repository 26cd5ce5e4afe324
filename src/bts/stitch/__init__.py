"""The BTS algorithm (paper §2): frozen hub and experts joined by trained stitch layers.

* :mod:`bts.stitch.layer` — ``StitchLayer``: one stitch layer, eq. 3 (E2H) and eq. 4 (H2E), and nothing else;
* :mod:`bts.stitch.model` — ``StitchConfig``, ``StitchedLM``: the n + 1 frozen models run layer by layer, stitch
  layers every few layers, the hub's head is the output;
* :mod:`bts.stitch.module` — ``StitchModule``: the stitching stage on the shared training loop;
* :mod:`bts.stitch.checkpoint` — a stitch checkpoint: only ``stitch_*`` tensors plus the frozen models' hashes;
* :mod:`bts.stitch.modularity` — remove or add an expert (paper §4.2, ``bts stitch-remove``);
* :mod:`bts.stitch.ceiling` — the head-drift ceiling of an ideal last E2H layer (``bts ceiling``);
* :mod:`bts.stitch.gates` — gate analysis of a trained model (paper §4.3, ``bts gates``): tracing, prompts, summary,
  figures, ``analyze`` and the command, one module each.
"""
