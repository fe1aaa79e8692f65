"""BTS models (Branch-Train-Stitch, Zhang et al. 2025, "BTS: Harmonizing Specialized Experts into a Generalist
LLM"): a frozen dense hub (the seed) and N frozen dense domain branches run side by side, joined by small stitch
layers that are the only trained parameters. Standalone (torch and transformers only): Connito imports it natively,
and ``save_pretrained`` copies this file and its relative import (``wrapped_base.py``) into the checkpoint with
``config.auto_map``, so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` builds the same
model in any process.

Layout (``model_type = connito_bts``): ``hub`` is the seed's own ``<Family>ForCausalLM`` (its embeddings, layers,
final norm and LM head), ``branches.<i>`` branch i's decoder (``<Family>Model``: embeddings, layers, final norm;
its LM head is not used), ``stitches.<j>`` the stitch after decoder layer ``(j + 1) * stitch_every - 1``.

A stitch, with ``h`` the hub's hidden state and ``b_i`` branch i's at that layer (all [B, S, H]):

* branches -> hub: ``h' = h + sum_i softmax(G h)_i * P_i b_i`` (gate ``to_hub_gate.weight`` G [N, H], softmax over
  the active branches; projections ``to_hub.<i>.weight`` P_i [H, H]);
* hub -> branches: ``b_i' = b_i + sigmoid(g_i . h) * Q_i h`` (``to_branch_gate.weight`` [N, H], one sigmoid gate per
  branch; ``to_branch.<i>.weight`` Q_i [H, H]).

The projections start at zero, so an untrained stitch is the identity and the model computes the hub's logits
exactly. The output is the hub's LM head on the hub's last hidden state: the branches inform the hub through the
stitches, never the output directly. ``active_branches`` (default: all) opts branches out at run time: an opted-out
branch is not run, and the to-hub softmax renormalises over the others, so removing a branch (or adding one trained
later with its own stitch rows) needs no retraining of the rest.

Generation runs without a KV cache (each step recomputes the prefix): the hub and the branches would need caches of
their own that the stitched states feed, which this model does not keep.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from .wrapped_base import WrappedBaseModel, base_config_of


class ConnitoBtsConfig(PretrainedConfig):
    model_type = "connito_bts"

    def __init__(
        self,
        base_config: dict | None = None,
        branch_names: list[str] | None = None,
        stitch_every: int = 2,
        active_branches: list[str] | None = None,
        **kwargs,
    ):
        self.base_config = dict(base_config or {})
        self.branch_names = list(branch_names or [])
        self.stitch_every = int(stitch_every)
        self.active_branches = list(active_branches) if active_branches is not None else list(self.branch_names)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "initializer_range"):
            if key in self.base_config:
                kwargs.setdefault(key, self.base_config[key])
        kwargs["use_cache"] = False
        kwargs["tie_word_embeddings"] = False  # the hub ties its own embeddings if its family does
        super().__init__(**kwargs)


class Stitch(nn.Module):
    """One stitch between the hub and N branches; see the module docstring."""

    def __init__(self, hidden: int, branches: int):
        super().__init__()
        self.to_hub_gate = nn.Linear(hidden, branches, bias=False)
        self.to_hub = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(branches))
        self.to_branch_gate = nn.Linear(hidden, branches, bias=False)
        self.to_branch = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(branches))
        for projection in [*self.to_hub, *self.to_branch]:
            projection.zero_init = True  # an untrained stitch is the identity (WrappedBaseModel._init_weights)

    def forward(self, hub: torch.Tensor, branches: dict[int, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        active = sorted(branches)
        logits = self.to_hub_gate(hub)[..., active]
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(hub.dtype)
        mixed = sum(weights[..., k : k + 1] * self.to_hub[i](branches[i]) for k, i in enumerate(active))
        gates = torch.sigmoid(self.to_branch_gate(hub))
        fed = {i: branches[i] + gates[..., i : i + 1] * self.to_branch[i](hub) for i in active}
        return hub + mixed, fed


class ConnitoBtsForCausalLM(WrappedBaseModel, GenerationMixin):
    config_class = ConnitoBtsConfig
    base_model_prefix = "hub"

    def __init__(self, config: ConnitoBtsConfig):
        super().__init__(config)
        base = base_config_of(config)
        self.hub = AutoModelForCausalLM.from_config(base)
        self.branches = nn.ModuleList(AutoModel.from_config(base) for _ in config.branch_names)
        points = config.num_hidden_layers // config.stitch_every
        self.stitches = nn.ModuleList(Stitch(config.hidden_size, len(config.branch_names)) for _ in range(points))
        self.post_init()

    def active_indices(self) -> list[int]:
        names = self.config.branch_names
        unknown = [n for n in self.config.active_branches if n not in names]
        if unknown:
            raise ValueError(f"active_branches names {unknown}, not branches of this model ({names})")
        return [i for i, name in enumerate(names) if name in self.config.active_branches]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                logits_to_keep=0, **kwargs):  # fmt: skip
        for key in ("past_key_values", "use_cache", "cache_position", "return_dict"):
            kwargs.pop(key, None)
        hub_model = self.hub.model
        hidden = hub_model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        active = self.active_indices()
        branches = {i: self.branches[i].embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
                    for i in active}  # fmt: skip
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=hub_model.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None,
            position_ids=position_ids,
        )  # fmt: skip
        rope = hub_model.rotary_emb(hidden, position_ids=position_ids)
        every = self.config.stitch_every
        for layer, hub_layer in enumerate(hub_model.layers):
            step = dict(attention_mask=mask, position_embeddings=rope, position_ids=position_ids, **kwargs)
            hidden = hub_layer(hidden, **step)
            branches = {i: self.branches[i].layers[layer](state, **step) for i, state in branches.items()}
            if (layer + 1) % every == 0 and (layer + 1) // every <= len(self.stitches):
                hidden, branches = self.stitches[(layer + 1) // every - 1](hidden, branches)
        hidden = hub_model.norm(hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.hub.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


ConnitoBtsConfig._auto_class = "AutoConfig"
ConnitoBtsForCausalLM._auto_class = "AutoModelForCausalLM"
