"""Bad routing-mode options and setups are refused before anything changes, each with the fix named."""

from types import SimpleNamespace

import pytest
import torch

from connito.routing.routing_export import load_routing_mode
from connito.routing.routing_modes import RoutingModes, RoutingOptions
from connito.training.callbacks import CallbackError, build_callbacks
from tests.experts.conftest import build_tiny


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "1.0", None])
def test_a_capacity_factor_must_be_a_positive_finite_number(bad):
    with pytest.raises(ValueError, match=r"capacity_factor=.*: give a finite number > 0"):
        RoutingOptions("expert_choice", capacity_factor=bad)


def test_a_capacity_above_every_token_is_refused_with_the_largest_allowed_factor():
    model = build_tiny("qwen3_moe")  # 8 experts, top-2
    with pytest.raises(ValueError, match=r"more than every token .* give capacity_factor <= 4"):
        RoutingModes(model, RoutingOptions("expert_threshold", capacity_factor=4.5))
    assert not any("connito_routing" in k for k in model.state_dict())  # nothing installed


def test_other_bad_options_are_named():
    with pytest.raises(ValueError, match="routing mode 'top_k' is not one of expert_choice, expert_threshold"):
        RoutingOptions("top_k")
    with pytest.raises(ValueError, match="predictor_inference='always' is not one of calibrated, half, top_k"):
        RoutingOptions("expert_choice", predictor_inference="always")
    for decay in (1.0, -0.1, True):
        with pytest.raises(ValueError, match=r"decay=.*: give a number in \[0, 1\)"):
            RoutingOptions("expert_threshold", decay=decay)


def test_a_block_with_a_routing_mode_refuses_a_second_one():
    model = build_tiny("qwen3_moe")
    RoutingModes(model, RoutingOptions("expert_choice"))
    with pytest.raises(ValueError, match="already has a routing mode"):
        RoutingModes(model, RoutingOptions("expert_threshold"))


def test_a_dense_model_has_no_experts_to_route():
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.composition.tiny import TINY_DENSE

    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY_DENSE))
    with pytest.raises(ValueError, match="dense model"):
        RoutingModes(dense, RoutingOptions("expert_choice"))


def fake_trainer(callbacks, ep_size=1, zero_stage=0):
    cfg = SimpleNamespace(parallel=SimpleNamespace(ep_size=ep_size), engine=SimpleNamespace(zero_stage=zero_stage))
    return SimpleNamespace(cfg=cfg, callbacks=callbacks, info=SimpleNamespace(is_main=True, world_size=1))


def test_the_callbacks_refuse_expert_parallelism_zero3_and_two_modes():
    (ec,) = build_callbacks({"expert_choice": {"capacity_factor": 1.0}})
    model = build_tiny("qwen3_moe")
    with pytest.raises(CallbackError, match=r"needs parallel.ep_size=1, not 2: DeepSpeed AutoEP"):
        ec.on_model_built(fake_trainer([ec], ep_size=2), model)
    with pytest.raises(CallbackError, match="ZeRO-3 partitions: use engine.zero_stage 0, 1 or 2"):
        ec.on_model_built(fake_trainer([ec], zero_stage=3), model)
    both = build_callbacks({"expert_choice": {}, "expert_threshold": {}})
    with pytest.raises(CallbackError, match="one routing mode per run; remove callbacks.expert_threshold"):
        both[0].on_model_built(fake_trainer(both), model)
    assert not any("connito_routing" in k for k in model.state_dict())


def test_the_callbacks_name_bad_options():
    with pytest.raises(CallbackError, match=r"^callbacks.expert_choice.capacity_factor=0: give a finite number"):
        build_callbacks({"expert_choice": {"capacity_factor": 0}})
    with pytest.raises(CallbackError, match="rejected its options"):
        build_callbacks({"expert_threshold": {"capacity": 1.0}})
    with pytest.raises(CallbackError, match="expert_threshold has no predictor"):
        build_callbacks({"expert_threshold": {"predictor_inference": "half"}})
    with pytest.raises(CallbackError, match="predictor_coef=-1.0: give a number >= 0"):
        build_callbacks({"expert_choice": {"predictor_coef": -1.0}})


def test_resuming_with_other_options_is_refused():
    (ec,) = build_callbacks({"expert_choice": {"capacity_factor": 1.0}})
    ec.load_state_dict(ec.state_dict())
    with pytest.raises(CallbackError, match="resume with the same options"):
        ec.load_state_dict({"options": {**ec.state_dict()["options"], "capacity_factor": 2.0}})


def test_loading_a_route_from_a_directory_without_one_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not the export of a run trained with a routing mode"):
        load_routing_mode(build_tiny("qwen3_moe"), tmp_path)


def test_the_routing_state_round_trips_and_refuses_another_models(tmp_path):
    from connito.routing.routing_export import write_routing_state

    model = build_tiny("qwen3_moe")
    routing = RoutingModes(model, RoutingOptions("expert_threshold", capacity_factor=0.5))
    model.train()
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 8)))
    write_routing_state(tmp_path, routing)
    fresh = build_tiny("qwen3_moe")
    loaded = load_routing_mode(fresh, tmp_path)
    assert loaded.options == routing.options
    for key, tensor in routing.state_tensors().items():
        assert torch.equal(loaded.state_tensors()[key], tensor)
    with pytest.raises(ValueError, match="the routing state is for a qwen3_moe model; this model is mixtral"):
        load_routing_mode(build_tiny("mixtral"), tmp_path)
