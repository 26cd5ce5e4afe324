"""Publishing a trained stage as a pinned checkpoint (``export`` in a profile): the weights and tokenizer
(``bts.dense.pinned.publish``) and the fingerprint of the first training steps that a test recomputes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from bts.cli.lightning import run_lightning
from bts.dense.pinned import PINNED_TOKENIZER_FILES


def first_steps_fingerprint(config: str | Path, tokenizer_src: Path, workdir: Path, steps: int = 2) -> dict:
    """Train ``config`` (a seed config naming ``runs/tiny/...`` paths) for ``steps`` steps in ``workdir`` with the
    tokenizer files of ``tokenizer_src`` and return a fingerprint of the weights: per tensor ``[sum, L2 norm]``.
    Pinned at publish time as ``first_steps.json``; a test recomputes it, so a change of the data, the tokenizer,
    the init or the optimiser that would change the regenerated seed is caught in seconds (tolerance ``rtol``
    covers float-kernel differences across CPUs)."""
    workdir, config = Path(workdir).resolve(), Path(config).resolve()
    tok = workdir / "runs" / "tiny" / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for n in PINNED_TOKENIZER_FILES:
        if (Path(tokenizer_src) / n).is_file():
            shutil.copyfile(Path(tokenizer_src) / n, tok / n)
    before = os.getcwd()
    threads = torch.get_num_threads()
    os.chdir(workdir)
    try:
        torch.set_num_threads(1)  # the fingerprint does not depend on the caller's thread count
        cli = run_lightning(["--config", str(config), f"--trainer.max_steps={steps}",
                             "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                             "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0"], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        weights = load_file(str(workdir / "runs" / "tiny" / "seed" / "model.safetensors"))
    finally:
        os.chdir(before)
        torch.set_num_threads(threads)
    try:
        config = config.relative_to(Path(before).resolve())
    except ValueError:
        pass
    return {"steps": steps, "config": config.as_posix(),
            "tensors": {k: [float(v.double().sum()), float(v.double().norm())] for k, v in sorted(weights.items())}}
