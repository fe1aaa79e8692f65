"""FFT-MoE's server: each adapter expert averaged over the clients that trained it (weights |D_n| over those clients
only), routers kept per client, and updates refused before aggregation (tampered, NaN, another base)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from connito.composition.fft_moe import AdapterSpec, adapter_state, install_adapters
from connito.composition.fft_moe.server import (
    UpdateRefused,
    accept_update,
    aggregate_round,
    client_start,
    update_bytes,
    write_update,
)
from connito.models.fingerprint import checkpoint_fingerprint
from tests.composition.tiny import TINY_DENSE

LAYERS, EXPERTS = (0, 1), 3
R = "model.layers.{}.mlp_adapter.router.weight"
E = "model.layers.{}.mlp_adapter.experts.{}.{}.weight"


def save_base(path, seed=0):
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY_DENSE)).save_pretrained(path)
    return path


@pytest.fixture
def base(tmp_path):
    return save_base(tmp_path / "base")


@pytest.fixture
def previous(base):
    model = AutoModelForCausalLM.from_pretrained(base)
    install_adapters(model, AdapterSpec(num_experts=EXPERTS, width=2, layers=LAYERS), top_k=1)
    return adapter_state(model)


def send(previous, base, out, client, num_examples, value, trained, **edit):
    """A client update whose every tensor is ``value`` and which routed tokens to the ``trained`` (layer, expert)."""
    tensors = {n: torch.full_like(t, value) for n, t in previous.items()}
    tensors.update(edit)
    tokens = [[5 if (layer, m) in trained else 0 for m in range(EXPERTS)] for layer in LAYERS]
    record = {"top_k": 1, "layers": list(LAYERS), "tokens_per_expert": tokens}
    return write_update(tensors, base, out, client=client, num_examples=num_examples, record=record)


def test_each_expert_is_the_data_weighted_mean_over_the_clients_that_trained_it(base, previous, tmp_path):
    updates = {
        "a": send(previous, base, tmp_path / "a", "a", 10, 1.0, {(0, 0), (0, 1)}),
        "b": send(previous, base, tmp_path / "b", "b", 30, 3.0, {(0, 0), (1, 2)}),
        "c": send(previous, base, tmp_path / "c", "c", 60, 7.0, {(1, 2), (0, 2)}),
    }
    out = aggregate_round(updates, base, previous)
    merged = out["global"]
    expected = {
        (0, 0): (10 * 1.0 + 30 * 3.0) / 40,  # a and b: c's 60 rows do not count
        (0, 1): 1.0,  # a alone
        (0, 2): 7.0,  # c alone
        (1, 2): (30 * 3.0 + 60 * 7.0) / 90,
    }
    for (layer, m), value in expected.items():
        for part in ("down", "up"):
            torch.testing.assert_close(
                merged[E.format(layer, m, part)], torch.full_like(merged[E.format(layer, m, part)], value)
            )
    for layer, m in [(1, 0), (1, 1)]:  # nobody routed a token there: the previous global value, bit for bit
        assert torch.equal(merged[E.format(layer, m, "down")], previous[E.format(layer, m, "down")])
    for layer in LAYERS:  # routers: never averaged, each client's own
        assert torch.equal(merged[R.format(layer)], previous[R.format(layer)])
        for client, value in (("a", 1.0), ("b", 3.0), ("c", 7.0)):
            assert torch.equal(
                out["routers"][client][R.format(layer)], torch.full_like(previous[R.format(layer)], value)
            )
    assert out["contributors"]["0.0"] == ["a", "b"] and out["contributors"]["1.1"] == []
    start = client_start(merged, out["routers"]["b"])
    assert torch.equal(start[R.format(0)], out["routers"]["b"][R.format(0)])
    assert torch.equal(start[E.format(0, 0, "up")], merged[E.format(0, 0, "up")])
    assert out["bytes"]["a"] == update_bytes(updates["a"]) > sum(t.numel() * 4 for t in previous.values())


def tamper(update_dir):
    file = update_dir / "adapters" / "modules.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))


def test_a_tampered_or_nan_update_is_refused_naming_the_client_and_stops_the_round(base, previous, tmp_path):
    good = send(previous, base, tmp_path / "good", "good", 10, 1.0, {(0, 0)})
    tampered = send(previous, base, tmp_path / "evil", "evil", 10, 5.0, {(0, 0)})
    tamper(tampered)
    name = E.format(0, 0, "up")
    nan = send(
        previous,
        base,
        tmp_path / "nan",
        "nan",
        10,
        2.0,
        {(0, 0)},
        **{name: torch.full_like(previous[name], float("nan"))},
    )
    fingerprint = checkpoint_fingerprint(base)
    with pytest.raises(
        UpdateRefused, match=r"update of client 'evil' refused: its package fails verification .*sha256"
    ):
        accept_update(tampered, fingerprint, previous)
    # up is [H=64, r=2]: 128 NaNs
    with pytest.raises(UpdateRefused, match=rf"update of client 'nan' refused: {name} holds 128 non-finite values"):
        accept_update(nan, fingerprint, previous)
    # default: the round stops at the first refusal
    with pytest.raises(UpdateRefused, match="client 'evil'"):
        aggregate_round({"good": good, "evil": tampered, "nan": nan}, base, previous)
    # allowed by config: the round goes on without them, and says whom it left out
    out = aggregate_round({"good": good, "evil": tampered, "nan": nan}, base, previous, skip_refused=True)
    assert out["accepted"] == ["good"] and sorted(out["refused"]) == ["evil", "nan"]
    assert torch.equal(out["global"][name], torch.full_like(previous[name], 1.0))  # only the good client's value


def test_an_update_trained_on_another_base_is_refused(base, previous, tmp_path):
    other = save_base(tmp_path / "other", seed=1)
    update = send(previous, other, tmp_path / "u", "mallory", 10, 1.0, {(0, 0)})
    with pytest.raises(UpdateRefused, match="update of client 'mallory' refused: it was trained on another base"):
        aggregate_round({"mallory": update}, base, previous)
    with pytest.raises(UpdateRefused, match="no update of this round was accepted"):
        aggregate_round({"mallory": update}, base, previous, skip_refused=True)
