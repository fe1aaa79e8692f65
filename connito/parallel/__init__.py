"""Model parallelism beyond data parallelism: expert parallelism on DeepSpeed AutoEP (``parallel.ep_size``)."""

from connito.parallel.expert_parallel import (
    ExpertParallelError,
    autoep_layers,
    autoep_section,
    build_hf_model,
    check_versions,
    gather_hf_state_dict,
    is_expert_parallel,
    local_parameter_count,
    num_routed_experts,
    validate_expert_parallel,
)

__all__ = [
    "ExpertParallelError",
    "autoep_layers",
    "autoep_section",
    "build_hf_model",
    "check_versions",
    "gather_hf_state_dict",
    "is_expert_parallel",
    "local_parameter_count",
    "num_routed_experts",
    "validate_expert_parallel",
]
