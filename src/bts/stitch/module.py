"""``StitchModule``: the BTS stitching stage as a Lightning module (``bts fit --config configs/bts/tiny.yaml``).

It loads the frozen hub and experts, builds a ``StitchedLM`` and trains only its stitch layers with the shared
``LMTrainingModule`` loop (next-token loss on the hub's logits, AdamW, warmup + cosine). The artifact written to
``output_dir`` is a stitch checkpoint (``bts.stitch.checkpoint``): stitch tensors + a manifest pinning the frozen
models by sha256. Lightning checkpoints likewise keep only the stitch tensors (the frozen models are reloaded from
their directories).

Adding an expert (paper §4.2): ``init_stitch_from`` names a trained stitch checkpoint whose hub and experts are a
subset of this module's (matched by name, weights verified by sha256); their slices are copied and the new experts
start at identity / zero gates. With ``train_only_new`` only the new experts' slices train. Implementation: a
boolean mask per stitch tensor; ``on_after_backward`` zeroes the gradient outside the mask (so AdamW's moments of
the old entries stay exactly 0 and its update there is exactly 0), and the masked tensors sit in an AdamW group
with ``weight_decay = 0`` — decoupled weight decay, if any, is applied to the new entries only, by hand, right
before each optimizer step (same formula as AdamW: ``p *= 1 - lr · wd``). The old slices stay bit-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from bts.core.io import BTSError
from bts.core.params import ParamCounts
from bts.dense.modeling import check_tokenizer_fits
from bts.stitch.model import StitchConfig, StitchedLM
from bts.training import flops
from bts.training.module import LMTrainingModule
from bts.training.optimizer import OPTIMIZER_DEFAULTS, OptimizerArgs, Unpack

FROZEN_DTYPES = ("auto", "float32", "bfloat16")


class StitchModule(LMTrainingModule):
    """Train the stitch layers of a hub and its experts; every model weight stays frozen and bit-identical."""

    # a lower peak than the dense models' and no decay: the stitch matrices start at the identity (projections)
    # and zero (gates), and decay would pull the projections away from the identity
    optimizer_defaults: ClassVar[OptimizerArgs] = {**OPTIMIZER_DEFAULTS, "lr": 1e-3, "weight_decay": 0.0}

    def __init__(
        self,
        hub: str,
        experts: list[str],
        expert_names: list[str] | None = None,
        hub_name: str | None = None,
        stitch: StitchConfig | None = None,
        init_stitch_from: str | None = None,
        train_only_new: bool = False,
        allow_changed_models: bool = False,
        output_dir: str | None = None,
        frozen_dtype: str = "auto",
        **optimizer: Unpack[OptimizerArgs],
    ):
        """
        Args:
            hub: Hugging Face directory of the hub (the seed by default; an expert for the hub-choice ablation).
            experts: Hugging Face directories of the spoke models (one for the two-model ablation).
            expert_names: names of the experts, i.e. their domains (default: the directory names without a leading
                ``expert_``: ``runs/tiny/expert_code`` → ``code``), one per expert.
            hub_name: name of the hub (default: the directory name).
            stitch: stitch configuration: K, alternating vs all-E2H, gate dropout, init, H2E gate init (default
                ``StitchConfig()``).
            init_stitch_from: trained stitch checkpoint to start from (adding an expert): slices of models with the
                same names are copied (their weights must match the checkpoint's sha256), new experts start at
                identity projections and zero gates. The hub and the stitch config must match.
            train_only_new: with ``init_stitch_from``, train only the new experts' slices (projection + gate rows);
                every other stitch entry stays bit-identical.
            allow_changed_models: accept models whose weights differ from ``init_stitch_from``'s manifest.
            output_dir: where the stitch checkpoint (``stitch.safetensors`` + ``bts.json``) is written after fit.
            frozen_dtype: dtype the frozen hub and experts are held in: ``auto`` (bfloat16 when the trainer's
                precision is bf16, else as loaded), ``float32`` or ``bfloat16``. Under bf16 autocast an fp32 frozen
                weight is cast to bf16 in every forward; held in bf16 it is not, and the models run as in their own
                bf16 inference. The weights stay bit-identical in the held dtype; the stitch layers stay float32.
            optimizer: ``lr``, ``warmup_steps``, ``min_lr_ratio``, ``weight_decay``, ``betas``
                (``bts.training.optimizer.OptimizerArgs``).
        """
        super().__init__(output_dir, **optimizer)
        if frozen_dtype not in FROZEN_DTYPES:
            raise BTSError(f"model.init_args.frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got "
                           f"{frozen_dtype!r}")
        config = stitch if stitch is not None else StitchConfig()
        if isinstance(config, dict):
            config = StitchConfig(**config)
        # hparams (read from the local variables) hold the config as a plain dict, so that Lightning checkpoints
        # load with torch.load(weights_only=True) and hparams.yaml stays plain YAML
        stitch = config.to_dict()
        self.save_hyperparameters()
        if train_only_new and init_stitch_from is None:
            raise BTSError("train_only_new needs init_stitch_from (the trained stitch checkpoint to extend)")
        self.model = StitchedLM.from_pretrained_dirs(
            hub, experts, config=config, hub_name=hub_name, expert_names=expert_names
        )
        self.strict_loading = False  # Lightning checkpoints hold only the stitch tensors
        self.new_experts: list[str] = []
        self._grad_masks: dict[str, str] = {}  # parameter name -> buffer name of its boolean mask
        if init_stitch_from is not None:
            self._init_from_checkpoint(init_stitch_from, allow_changed_models)
        if train_only_new:
            if not self.new_experts:
                raise BTSError(
                    f"train_only_new: every expert of this run is already in {init_stitch_from}; nothing is new"
                )
            from bts.stitch.modularity import new_slice_masks

            for k, (name, mask) in enumerate(new_slice_masks(self.model, self.new_experts).items()):
                buf = f"_grad_mask_{k}"
                self.register_buffer(buf, mask, persistent=False)
                self._grad_masks[f"model.{name}"] = buf

    def _init_from_checkpoint(self, ckpt: str, allow_changed_models: bool) -> None:
        from bts.stitch.checkpoint import check_models, load_stitch_state, manifest_config, read_manifest
        from bts.stitch.modularity import remap_stitch_state

        manifest = read_manifest(ckpt)
        src_names = [manifest["hub"]["name"], *[e["name"] for e in manifest["experts"]]]
        cfg = manifest_config(manifest)
        mine = self.model.config
        if ((cfg.num_stitch_layers, cfg.all_e2h, cfg.h2e_gate_init)
                != (mine.num_stitch_layers, mine.all_e2h, mine.h2e_gate_init)):
            raise BTSError(
                f"init_stitch_from={ckpt} has num_stitch_layers={cfg.num_stitch_layers}, all_e2h={cfg.all_e2h}, "
                f"h2e_gate_init={cfg.h2e_gate_init}; this run has {mine.num_stitch_layers}, {mine.all_e2h}, "
                f"{mine.h2e_gate_init}"
            )
        if (
            manifest["hidden_size"] != self.model.hidden_size
            or manifest["num_layers"] != self.model.num_layers
        ):
            raise BTSError(f"init_stitch_from={ckpt} was trained for different model dimensions")
        missing = [n for n in src_names[1:] if n not in self.model.expert_names]
        if missing:
            raise BTSError(
                f"init_stitch_from={ckpt} has expert(s) {missing} that this run lacks "
                f"(experts: {self.model.expert_names}); remove them first with `bts stitch-remove`"
            )
        if src_names[0] != self.model.names[0]:
            raise BTSError(
                f"the hub differs: {ckpt} was trained with hub {src_names[0]!r}, not {self.model.names[0]!r}"
            )
        # verify the shared models against the checkpoint's hashes (matched by name)
        models = [self.model.models[self.model.names.index(n)] for n in src_names]
        self.model.changed_models = check_models(manifest, models, allow_changed_models, ckpt)
        self.model.allow_changed_models = allow_changed_models
        state, self.new_experts = remap_stitch_state(load_stitch_state(ckpt), src_names, self.model.names)
        self.model.load_stitch_state_dict(state)

    # --- model -------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.model(input_ids)

    def hidden_and_head(self, input_ids: torch.LongTensor):
        return self.model.hidden_states(input_ids), self.model.output_head

    def flops_per_token(self, seq_len: int) -> float:
        """The BTS step (``bts.training.flops.stitched_train_flops``): n+1 forwards, the backward the stitch gradients need."""
        return flops.stitched_train_flops(self.model._parts[0].config, self.model.n_experts, self.model.placement(),
                                          seq_len)

    def frozen_torch_dtype(self) -> torch.dtype | None:
        """The dtype ``frozen_dtype`` asks for under this trainer (None: keep the loaded dtype)."""
        want = self.hparams.get("frozen_dtype", "auto")
        if want == "auto":
            precision = str(getattr(self.trainer, "precision", "32")) if self._trainer is not None else "32"
            return torch.bfloat16 if precision.startswith("bf16") else None
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[want]

    @torch.no_grad()
    def generate(
        self, input_ids, max_new_tokens, eos_token_id=None, do_sample=False, temperature=1.0, generator=None
    ):
        return self.model.generate(input_ids, max_new_tokens, eos_token_id, do_sample, temperature, generator)

    def param_counts(self) -> ParamCounts:
        counts = self.model.param_counts()
        if self._grad_masks:
            counts.trained = int(sum(int(getattr(self, b).sum()) for b in self._grad_masks.values()))
        return counts

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        check_tokenizer_fits(getattr(dm, "tokenizer", None), self.model.vocab_size, "the stitched models'")
        dtype = self.frozen_torch_dtype()
        if dtype is not None and dtype != next(self.model.hub.parameters()).dtype:
            self.model.hold_frozen_in(dtype)

    # --- train_only_new: gradient masks --------------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict]:
        """With ``train_only_new``: the masked stitch tensors in a group without weight decay (the new entries' decay
        is applied by hand, ``on_before_optimizer_step``); else the shared groups."""
        if not self._grad_masks:
            return super().optimizer_groups()
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in self._grad_masks], "weight_decay": 0.0, "bts_masked": True}]
        free = [p for n, p in named if n not in self._grad_masks]
        if free:  # cannot happen today (every stitch tensor is masked); kept for safety
            groups.append({"params": free, "weight_decay": self.weight_decay})
        return groups

    def _masked_params(self):
        params = dict(self.named_parameters())
        for name, buf in self._grad_masks.items():
            yield params[name], getattr(self, buf)

    def on_after_backward(self) -> None:
        for p, mask in self._masked_params():
            if p.grad is not None:
                p.grad.copy_(torch.where(mask, p.grad, torch.zeros_like(p.grad)))

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)  # non-finite gradient check
        if not self._grad_masks or self.weight_decay == 0:
            return
        lr = next(g["lr"] for g in optimizer.param_groups if g.get("bts_masked"))
        with torch.no_grad():
            for p, mask in self._masked_params():
                p.copy_(torch.where(mask, p * (1 - lr * self.weight_decay), p))

    # --- checkpoints and artifact --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.stitch_")
        }

    def save_artifact(self, out_dir: Path) -> None:
        from bts.stitch.checkpoint import write_stitched

        extra = {
            "training": {
                "init_stitch_from": self.hparams.init_stitch_from,
                "train_only_new": bool(self.hparams.train_only_new),
                "new_experts": list(self.new_experts),
            }
        }
        write_stitched(self.model, out_dir, extra)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(dm, "tokenizer", None) is not None:
            dm.tokenizer.save_pretrained(out_dir)
