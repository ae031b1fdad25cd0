"""The reference trainer: Hugging Face transformers + torch.optim.AdamW on our batches.

It trains the model our converter exports (same weights, same function) with the
optimizer settings of our config: the same AdamW hyper-parameters, the same
learning rate at every step, global-norm clipping and the same weight-decay mask.
The parity test and benchmarks/reference.py compare this stack against it.
Needs the `hf` extra (torch, transformers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import transformers

from configs.schema import Config
from hf.format import hf_config, params_to_hf, rules
from train.optimizer import decays, lr_schedule

Batch = dict[str, np.ndarray]


def hf_model(config: Config, params: Any) -> torch.nn.Module:
    """The transformers model of our (unstacked) parameters, float32, in training mode."""
    cfg = config.model
    hf = hf_config(cfg)
    kind = transformers.GPT2Config if cfg.family == "gpt2" else transformers.LlamaConfig
    module_class = (transformers.GPT2LMHeadModel if cfg.family == "gpt2"
                    else transformers.LlamaForCausalLM)
    settings = {k: v for k, v in hf.items() if k != "architectures"}
    module = module_class(kind(**{"bos_token_id": None, "eos_token_id": None, **settings}))
    state = {name: torch.from_numpy(array) for name, array in params_to_hf(params, cfg).items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    tied_head = ["lm_head.weight"] if cfg.tie_embeddings else []
    if [m for m in missing if m not in tied_head] or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return module.float().train()


def attention_mask(segment_ids_BxL: torch.Tensor) -> torch.Tensor:
    """B x 1 x L x L: causal and within one document, as our packed rows attend."""
    length = segment_ids_BxL.shape[1]
    causal_LxL = torch.tril(torch.ones(length, length, dtype=torch.bool))
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return (causal_LxL & same_BxLxL)[:, None]


def batch_loss(module: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over tokens of weight 1, as our loss is defined."""
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    logits_BxLxV = module(input_ids=tensors["inputs"].long(),
                          position_ids=tensors["positions"].long(),
                          attention_mask=attention_mask(tensors["segment_ids"])).logits
    losses = torch.nn.functional.cross_entropy(
        logits_BxLxV.reshape(-1, logits_BxLxV.shape[-1]).float(),
        tensors["targets"].long().reshape(-1), reduction="none")
    weights = tensors["weights"].float().reshape(-1)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


class ReferenceTrainer:
    """One AdamW step per call of `step`, on the batch given, as a PyTorch user would."""

    def __init__(self, config: Config, params: Any):
        self.config = config
        self.module = hf_model(config, params)
        optim = config.optim
        decayed, kept = self._split_by_decay()
        self.optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": optim.weight_decay},
             {"params": kept, "weight_decay": 0.0}],
            lr=optim.learning_rate, betas=(optim.beta1, optim.beta2), eps=optim.eps)
        schedule = lr_schedule(optim, config.train.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda count: float(schedule(count)) / optim.learning_rate)

    def _split_by_decay(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """HF parameters whose weights decay, and the rest, by our parameters' paths."""
        ours = {rule.hf: rule.ours[0] for rule in rules(self.config.model)}
        decay_embeddings = self.config.optim.decay_embeddings
        decayed, kept = [], []
        for name, parameter in self.module.named_parameters():
            (decayed if decays(ours[name], decay_embeddings) else kept).append(parameter)
        return decayed, kept

    def step(self, batch: Batch) -> float:
        """Loss of the batch before the update; then the update."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = batch_loss(self.module, batch)
        loss.backward()
        if self.config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        """Token-weighted mean loss over held-out batches, without dropout."""
        self.module.eval()
        loss_sum = tokens = 0.0
        for batch in batches:
            count = float(np.sum(batch["weights"]))
            loss_sum += float(batch_loss(self.module, batch)) * count
            tokens += count
        self.module.train()
        return loss_sum / max(tokens, 1.0)
