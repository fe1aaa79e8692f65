"""FFT-MoE's sparse MoE adapters: exact base logits at round 0 on every family, the adapter's math, the
budget-normalised balance loss against a direct computation, a frozen base through AdamW, and a client's run on the
one trainer."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from connito.composition.fft_moe import (
    AdapterError,
    AdapterSpec,
    adapter_state,
    budget_balance_loss,
    freeze_base,
    install_adapters,
    load_adapter_state,
)
from connito.training.callbacks import CallbackError
from connito.training.trainer import run_training
from tests.composition.tiny import TINY_DENSE
from tests.experts.conftest import TINY, build_tiny
from tests.helpers import compose_train, small_overrides

DENSE = ["llama", "qwen3", "qwen2"]


def tiny(model_type: str):
    if model_type in DENSE:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY_DENSE)).eval()
    return build_tiny(model_type)


@pytest.mark.parametrize("model_type", DENSE + sorted(TINY))
def test_round_zero_adapters_leave_the_base_logits_bit_identical(model_type):
    model = tiny(model_type)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
    adapters = install_adapters(model, AdapterSpec(num_experts=4, width=8), top_k=2)
    assert sorted(adapters) == list(range(model.config.num_hidden_layers))
    names = dict(model.named_parameters())
    assert "model.layers.0.mlp_adapter.experts.3.down.weight" in names
    assert "model.layers.1.mlp_adapter.router.weight" in names
    with torch.no_grad():
        adapted = model(ids).logits
    assert torch.equal(adapted, base)
    # the adapter is live: a non-zero up-projection changes the logits
    with torch.no_grad():
        for adapter in adapters.values():
            for expert in adapter.experts:
                expert.up.weight.normal_()
        assert not torch.allclose(model(ids).logits, base)


def test_the_adapter_adds_the_renormalised_top_k_mixture_of_its_experts():
    model = tiny("qwen3_moe")
    adapter = install_adapters(model, AdapterSpec(num_experts=5, width=4, activation="relu", layers=(1,)), 3)[1]
    torch.manual_seed(2)
    for expert in adapter.experts:
        torch.nn.init.normal_(expert.up.weight)
    x = torch.randn(2, 7, 64)
    expected = torch.zeros(2, 7, 64)
    for b in range(2):
        for t in range(7):
            p = torch.softmax(adapter.router.weight @ x[b, t], dim=0)
            top = torch.topk(p, 3)
            for w, m in zip(top.values / top.values.sum(), top.indices.tolist(), strict=True):
                e = adapter.experts[m]
                expected[b, t] += w * (e.up.weight @ torch.relu(e.down.weight @ x[b, t]))
    torch.testing.assert_close(adapter(x), expected, rtol=1e-5, atol=1e-6)
    # the hook adds it to the FFN's output and leaves the layers without an adapter alone
    layers = model.model.layers
    torch.testing.assert_close(layers[1].mlp(x), layers[1].mlp.forward(x) + adapter(x))
    assert not hasattr(layers[0], "mlp_adapter")


def test_balance_loss_is_the_budget_normalised_load_times_mean_probability():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5], [1.0, 0.0, 2.0, 0.0]])
    top_k, tokens, experts = 2, 3, 4
    # by hand: top-2 of each row are {0,1}, {1,2}, {2,0}: loads 2,2,2,0 of 6 slots
    load = torch.tensor([2.0, 2.0, 2.0, 0.0]) / (tokens * top_k)
    mean_p = torch.softmax(logits, dim=-1).mean(dim=0)
    expected = experts * (load * mean_p).sum()
    torch.testing.assert_close(budget_balance_loss(logits, top_k), expected)
    # tokens spread evenly over the experts cost exactly 1 for every budget (the normalisation by the budget)
    spread = torch.eye(4).repeat(2, 1) * 10  # 8 tokens, each expert first for 2 of them
    for k in (1, 2, 4):
        assert budget_balance_loss(spread, k).item() == pytest.approx(1.0, abs=1e-3)
    # and collapsing onto one expert costs M
    assert budget_balance_loss(torch.tensor([[50.0, 0, 0, 0]] * 5), 1).item() == pytest.approx(4.0)


def test_a_frozen_base_stays_bit_identical_through_adamw_and_only_routed_experts_move():
    model = tiny("qwen2_moe").train()
    install_adapters(model, AdapterSpec(num_experts=16, width=4), top_k=1)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "mlp_adapter" not in n}
    start = adapter_state(model)
    trainable, total = freeze_base(model)
    assert trainable == sum(t.numel() for t in start.values()) and trainable < total
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 128, (1, 3))  # 3 tokens, budget 1: at most 3 of 16 experts per layer are routed
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name
    after = adapter_state(model)
    ups = [n for n in after if n.endswith("up.weight")]
    moved = [n for n in ups if not torch.equal(after[n], start[n])]
    assert moved and len(moved) < len(ups)  # the routed experts learned; the never-routed ones kept their zeros


def test_refusals_name_the_problem_and_the_fix():
    with pytest.raises(AdapterError, match="budget top_k=5 must be between 1 and the adapter's num_experts=4"):
        AdapterSpec(num_experts=4).check_budget(5)
    with pytest.raises(AdapterError, match="width=0 must be >= 1"):
        AdapterSpec(width=0)
    with pytest.raises(AdapterError, match=r"layers=\[\] puts no adapter anywhere"):
        AdapterSpec(layers=())
    model = tiny("llama")
    with pytest.raises(AdapterError, match=r"adapter layers \[5\] are not decoder layers of this model \(it has 2\)"):
        install_adapters(model, AdapterSpec(layers=(5,)), 1)
    install_adapters(model, AdapterSpec(num_experts=4, width=8), 1)
    with pytest.raises(AdapterError, match="already has an adapter"):
        install_adapters(model, AdapterSpec(), 1)
    wrong = {n: t for n, t in adapter_state(model).items() if "router" not in n}
    with pytest.raises(AdapterError, match="missing .*router.weight"):
        load_adapter_state(model, wrong)


@pytest.fixture
def client(data_cache):
    return small_overrides(data_cache) + [
        "model=qwen3_moe_tiny",
        "model.aux_loss_coef=0",
        "train.steps=4",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "+callbacks.fft_moe.top_k=2",
        "+callbacks.fft_moe.num_experts=4",
        "+callbacks.fft_moe.width=8",
    ]


@pytest.mark.slow
def test_a_client_trains_its_adapters_on_the_trainer_and_exports_them_beside_the_untouched_base(client, tmp_path):
    import connito.composition.fft_moe  # noqa: F401  (registers callbacks.fft_moe)

    cfg = compose_train(client)
    result = run_training(cfg, tmp_path / "client")
    rows = [json.loads(line) for line in (tmp_path / "client" / "metrics.jsonl").read_text().splitlines()]
    balance = [r["train/adapter_balance_loss"] for r in rows if "train/adapter_balance_loss" in r]
    assert len(balance) == 4 and all(0 < value <= 4 for value in balance)  # M * max mean probability at most
    export = result.export_dir
    # the export is the base alone (plain transformers loads it, no adapter keys) and equals the frozen start
    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert not any("mlp_adapter" in n for n in exported.state_dict())
    torch.manual_seed(cfg.train.seed)
    fresh = AutoModelForCausalLM.from_config(exported.config, dtype=torch.float32)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
    adapters = load_file(export / "fft_moe_adapters.safetensors")
    assert len(adapters) == 4 * (1 + 2 * 4)  # 4 layers x (router + 4 experts x (down, up))
    assert any(adapters[n].abs().sum() > 0 for n in adapters if n.endswith("up.weight"))
    record = json.loads((export / "fft_moe_adapters.json").read_text())
    assert record["top_k"] == 2 and record["layers"] == [0, 1, 2, 3]
    tokens = torch.tensor(record["tokens_per_expert"])
    # every training token of every micro-batch was routed to 2 experts on every layer
    steps, rows_per_step, seq = 4, cfg.train.micro_batch_size * cfg.train.grad_accum, cfg.data.seq_len
    assert tokens.sum(dim=1).tolist() == [2 * steps * rows_per_step * seq] * 4


def test_the_client_callback_refuses_a_balanced_base_router_and_trainable(client, tmp_path):
    import connito.composition.fft_moe  # noqa: F401

    with pytest.raises(CallbackError, match="set model.aux_loss_coef=0"):
        run_training(compose_train([*client, "model.aux_loss_coef=0.01"]), tmp_path / "a")
    with pytest.raises(CallbackError, match="cannot run together"):
        run_training(compose_train([*client, "+callbacks.trainable.experts=[]"]), tmp_path / "b")
