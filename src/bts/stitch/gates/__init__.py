"""Gate analysis of a trained BTS model (paper §4.3): which model does the hub listen to, token by token?

``bts gates --ckpt runs/tiny/bts --tokenizer runs/tiny/tokenizer --out results/tiny [--tensorboard DIR]``

Every Experts-into-Hub (E2H) stitch layer mixes the hub and the experts with a softmax over models per hidden
dimension; ``StitchedLM.record_gates()`` averages it over the hidden dimensions, which gives one weight per model
per token (the weights of one token sum to 1). This package

1. traces those weights (``trace.gate_trace``: eval mode, so no gate dropout; no grad) for
   - **domain prompts**: ``n_prompts`` prompts per domain from the test split (``bts.data.load_split``), chosen
     with a seeded permutation of the records. Records of the math and multilingual domains are short (one problem,
     one UI-string pair), so a prompt starts with the chosen record and, when it is shorter than ``max_tokens``, is
     filled with the next records of the same domain (joined by ``"\\n\\n"``), then truncated to ``max_tokens``
     tokens; the records of the prompts of one domain do not overlap (unless the split has too few records);
   - **context-switching prompts**: blocks of the domain-switching evaluation (``bts.eval.tasks.switching``,
     built by the same function and seed, ``max_tokens`` long): a window of a packed stream in which documents of
     one domain are followed by documents of another, switching at the middle of the block, one prompt per type
     of ``GATE_SWITCH_TYPES`` (general → code, math → general, code → multilingual, multilingual → math); the
     switch position and the two segments' domains are kept. So the figures show the same kind of switch whose
     post-switch tokens the evaluation scores;
2. summarises them (``summary.summarize``): per domain and per E2H layer the mean gate per model, where a prompt's
   value is the mean over its tokens and the domain's value is the mean over its prompts (each prompt counts once); the
   overall mean per model is the mean over **all** domain prompts (each prompt counts once, so with equal prompt
   counts it is the mean of the domain means). For every expert whose name is a domain (``code``, ``math``,
   ``multilingual``; also ``expert_<domain>``) it records whether its mean gate on its own domain's prompts exceeds
   its overall mean (``own_domain_flags``) — the paper's specialisation claim — for the last E2H layer (the one that
   feeds the output) and per E2H layer;
3. draws (``figures``: matplotlib, Agg canvas, PNG, each file written atomically) under ``<out>/figures/``:
   ``gates_<domain>.png`` (last E2H layer: gate per model over token positions for one representative prompt, plus
   the position-wise mean over the domain's prompts), ``gates_switch_<i>.png`` (one per context-switching prompt,
   boundaries as vertical lines, segment domains labelled) and ``gates_summary.png`` (grouped bars and a heatmap of
   the mean gate per model per domain);
4. writes ``<out>/gates.json`` (``analysis.analyze``; schema: ``summarize`` + ``analyze``; includes a markdown table
   for the results README) and, optionally, the figures / scalars / table to TensorBoard (``log_to_tensorboard``).

Errors in the input (missing checkpoint, tokenizer, records; a tokenizer larger than the model's vocabulary) raise
``BTSError`` before anything is written; ``bts gates`` (``command.gates_command``) prints them as one ``error: ...`` line and
exits 2.

Modules: ``recorder`` (``GateRecorder``, what ``StitchedLM.record_gates()`` fills), ``trace`` (recording the gates of
prompts), ``prompts`` (domain and context-switching prompts), ``summary`` (means,
the specialisation flags, the markdown table), ``figures`` (PNGs and TensorBoard), ``analysis`` (``analyze``: all
of it for one checkpoint), ``command`` (``bts gates``).
"""
