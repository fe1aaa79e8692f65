"""ExpertMask: JSON round trip, set algebra, and the exact errors for addresses that do not fit the model."""

import json

import pytest
import torch

from connito.experts import ExpertAddressError, ExpertId, ExpertMask, ExpertView

# 4 decoder layers, layer 0 dense (DeepSeek's first_k_dense_replace=1), 6 routed experts per MoE layer
SHAPE = {"num_layers": 4, "num_experts": 6, "moe_layers": [1, 2, 3]}


def test_json_round_trip_and_format():
    mask = ExpertMask.from_ids([(2, 5), (1, 0), (1, 3)], **SHAPE)
    data = json.loads(mask.to_json())
    assert data == {"shape": [4, 6], "moe_layers": [1, 2, 3], "experts": {"1": [0, 3], "2": [5], "3": []}}
    back = ExpertMask.from_json(mask.to_json(indent=2))
    assert back == mask and torch.equal(back.mask_LE, mask.mask_LE)
    assert back.ids() == [ExpertId(1, 0), ExpertId(1, 3), ExpertId(2, 5)]
    assert ExpertMask.from_json(ExpertMask.full(**SHAPE).to_json()) == ExpertMask.full(**SHAPE)


def test_set_operations():
    a = ExpertMask.from_ids([(1, 0), (1, 1), (2, 2)], **SHAPE)
    b = ExpertMask.from_ids([(1, 1), (3, 4)], **SHAPE)
    assert (a | b).ids() == [(1, 0), (1, 1), (2, 2), (3, 4)]
    assert (a & b).ids() == [(1, 1)]
    assert (a - b).ids() == [(1, 0), (2, 2)]
    assert (a ^ b).ids() == [(1, 0), (2, 2), (3, 4)]
    complement = ~a
    assert len(complement) == 3 * 6 - 3 and not complement.mask_LE[0].any()  # dense row stays empty
    assert (complement | a) == ExpertMask.full(**SHAPE)
    assert (1, 1) in a and (3, 4) not in a and len(a) == 3
    a.clear((1, 1))
    assert a.ids() == [(1, 0), (2, 2)]


def test_mask_tensor_is_a_copy():
    mask = ExpertMask.empty(**SHAPE)
    mask.mask_LE[1, 1] = True
    assert len(mask) == 0


@pytest.mark.parametrize(
    ("expert_id", "message"),
    [
        ((4, 0), "layer 4 is out of range: the model has 4 decoder layers (0..3)"),
        ((-1, 0), "layer -1 is out of range: the model has 4 decoder layers (0..3)"),
        ((0, 2), "layer 0 is a dense layer (no MoE block); the MoE layers are [1, 2, 3]"),
        ((2, 6), "expert 6 is out of range: layer 2 has 6 routed experts (0..5)"),
        ((2, -1), "expert -1 is out of range: layer 2 has 6 routed experts (0..5)"),
        ((2,), "an expert id is (layer, expert), got (2,)"),
    ],
)
def test_bad_ids_are_refused_with_exact_messages(expert_id, message):
    mask = ExpertMask.empty(**SHAPE)
    with pytest.raises(ExpertAddressError) as err:
        mask.set(expert_id)
    assert str(err.value) == message
    assert len(mask) == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"shape": [4, 6], "moe_layers": [1, 2, 3], "experts": {"0": [1]}},
            "layer 0 is a dense layer (no MoE block); the MoE layers are [1, 2, 3]",
        ),
        (
            {"shape": [4, 6], "moe_layers": [1, 2, 3], "experts": {"7": [1]}},
            "layer 7 is out of range: the model has 4 decoder layers (0..3)",
        ),
        (
            {"shape": [4, 6], "moe_layers": [1, 2, 3], "experts": {"1": [6]}},
            "expert 6 is out of range: layer 1 has 6 routed experts (0..5)",
        ),
        (
            {"shape": [4, 6], "moe_layers": [1, 4], "experts": {}},
            "MoE layer 4 is out of range: the mask has 4 layers (0..3)",
        ),
        (
            {"shape": [4], "moe_layers": [1], "experts": {}},
            "expert mask JSON 'shape' must be [layers, experts] (positive), got [4]",
        ),
        (
            {"shape": [4, 6], "experts": {}},
            "expert mask JSON is missing ['moe_layers']; it needs shape, moe_layers, experts",
        ),
        (
            {"shape": [4, 6], "moe_layers": [1], "experts": {"one": [1]}},
            "expert mask JSON layer keys are integers, got 'one'",
        ),
    ],
)
def test_bad_json_is_refused_with_exact_messages(data, message):
    with pytest.raises(ExpertAddressError) as err:
        ExpertMask.from_json(json.dumps(data))
    assert str(err.value) == message


def test_dense_rows_cannot_be_smuggled_in_by_tensor():
    mask_LE = torch.zeros(4, 6, dtype=torch.bool)
    mask_LE[0, 2] = True
    with pytest.raises(ExpertAddressError, match=r"^layer 0 is a dense layer"):
        ExpertMask(mask_LE, [1, 2, 3])


def test_masks_of_different_models_do_not_mix():
    other = ExpertMask.empty(num_layers=4, num_experts=6, moe_layers=[0, 1, 2, 3])
    with pytest.raises(ExpertAddressError, match=r"^expert masks of different models: shape \(4, 6\) with MoE layers"):
        ExpertMask.empty(**SHAPE) | other


def test_view_mask_matches_the_model(tiny_builder):
    model = tiny_builder("deepseek_v2")
    mask = ExpertView(model).empty_mask()
    assert mask.shape == (3, 8) and mask.moe_layers == (1, 2)
    assert ExpertMask.from_json(ExpertMask.full(3, 8, [1, 2]).to_json()).ids()[0] == (1, 0)
