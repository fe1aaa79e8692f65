"""Expert-group jobs: split a base MoE's routed experts into disjoint groups, one per domain, train each group as an
independent job that touches only its experts, then merge the jobs' expert delta packages back onto the base.

The workflow (only the first and last steps are here; training is ``connito adapt``)::

    groups = partition_from_analysis("runs/analysis", ["code", "math"], top_p=0.2)  # {domain: ExpertMask}
    masks = write_group_masks(groups, "ckpt/base", "groups/")                       # {domain: groups/<d>.mask.json}
    # per domain, anywhere, in any order:
    #   connito adapt method=esft esft.mask_file=groups/code.mask.json model.path=ckpt/base data.domains=[code]
    merge_groups("ckpt/base", {"code": "runs/code/delta", "math": "runs/math/delta"}, "ckpt/merged",
                 validate=held_out_validator("ckpt/base", data_cfg, ["code", "math"]))

The package, by responsibility:

- :mod:`~connito.composition.expert_groups.partition`: the disjoint groups from per-domain scores
  (:func:`~connito.composition.expert_groups.partition.partition_experts`, ``partition_from_analysis``) and their
  ``connito.mask/1`` files (``write_group_masks``);
- :mod:`~connito.composition.expert_groups.merge`: the jobs' delta packages merged back onto the base
  (:func:`~connito.composition.expert_groups.merge.merge_groups`), overlaps refused or resolved;
- :mod:`~connito.composition.expert_groups.validation`: the loss gate a merge passes before it is published
  (``validate_merge``, ``held_out_validator``).

Shape legend: D domains (groups), L MoE layers (index i is ``moe_layers[i]``, as in analysis.json), E routed
experts per MoE layer.
"""
