"""``connito federated``: the plan (base, init, per round the clients' jobs then the aggregation), its refusals, and
(slow) two clients with budgets 1 and 2 for two rounds on CPU: the base stays bit-identical, each round's global
experts are the |D_n|-weighted mean of the updates of the clients that routed them a token, each client keeps its
own router, a rerun runs nothing, and a killed (deleted) client job is rerun alone."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from connito.orchestration import read_plan
from connito.orchestration.federated import FederatedConfig, plan_federated
from connito.orchestration.jobs import read_state
from tests.orchestration import pipelines

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config(tmp_path, **changes) -> FederatedConfig:
    return pipelines.config(FederatedConfig, tmp_path, "fed", **changes)


def test_the_plan_trains_a_base_draws_the_adapters_then_runs_clients_and_aggregation_per_round(tmp_path):
    plan = plan_federated(config(tmp_path, rounds=2))
    root = tmp_path / "fed"
    stages = ["base", "init", "round-0", "aggregate-0", "round-1", "aggregate-1", "export"]
    assert [s.name for s in plan.stages] == stages
    assert [j.name for j in plan.stages[4].jobs] == ["r1-code", "r1-docs"]
    code = plan.job("r1-code").command
    assert code[0] == "train" and "data.domains=['code']" in code and "model.aux_loss_coef=0" in code
    assert f"model.path='{root / 'base' / 'hf'}'" in code
    assert "+callbacks.fft_moe.top_k=1" in code and "+callbacks.fft_moe.top_k=2" in plan.job("r1-docs").command
    assert f"+callbacks.fft_moe.init='{root / 'round-001' / 'start-code.safetensors'}'" in code
    assert plan.job("r1-code").outputs == (str(root / "r1-code" / "update" / "update.json"),)
    aggregate = plan.job("aggregate-1")
    assert "stage=aggregate" in aggregate.command and "round_index=1" in aggregate.command
    assert aggregate.outputs == (str(root / "round-002" / "global.safetensors"),)
    assert plan.all_settings()["skip_refused"] is False
    assert "stage=export" in plan.job("export").command
    assert plan.job("export").outputs == (str(root / "federated_report.json"),)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"budgets": [1]}, r"budgets=\[1\] has 1 entries for 2 clients \[.code., .docs.\]: give one budget"),
        ({"budgets": [1, 9]}, r"budgets \[9\] are not between 1 and adapter.num_experts=8"),
        ({"clients": ["code", "math"]}, r"clients: unknown domain\(s\) 'math'"),
        ({"rounds": 0}, r"rounds=0: run at least 1 round"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        plan_federated(config(tmp_path, **changes))


def expert_names(tensors: dict, layer: int, expert: int) -> list[str]:
    return [n for n in tensors if f".layers.{layer}.mlp_adapter.experts.{expert}." in n]


@pytest.mark.slow
def test_two_clients_two_rounds_aggregate_per_expert_over_who_trained_it(tmp_path, data_cache):
    args = pipelines.small("federated", tmp_path, data_cache, "fed", "base.steps=4", "client_steps=3", "rounds=2",
                           "adapter.num_experts=4", "adapter.width=8")  # fmt: skip
    done = pipelines.connito(args, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    root = tmp_path / "fed"
    plan = read_plan(root)
    assert {read_state(root, job.name).status for job in plan.jobs()} == {"done"}

    base = load_file(root / "base" / "hf" / "model.safetensors")
    for index in range(2):
        previous = load_file(root / f"round-{index:03d}" / "global.safetensors")
        merged = load_file(root / f"round-{index + 1:03d}" / "global.safetensors")
        updates = {}
        for client in ("code", "docs"):
            update = root / f"r{index}-{client}" / "update"
            record = json.loads((update / "update.json").read_text())
            updates[client] = (record, load_file(update / "adapters" / "modules.safetensors"))
            exported = load_file(root / f"r{index}-{client}" / "hf" / "model.safetensors")
            assert all(torch.equal(exported[k], base[k]) for k in base)  # the base never moved
        assert updates["code"][0]["top_k"] == 1 and updates["docs"][0]["top_k"] == 2
        checked = 0
        for row, layer in enumerate(updates["code"][0]["layers"]):
            for expert in range(4):
                who = [c for c, (rec, _) in updates.items() if rec["tokens_per_expert"][row][expert] > 0]
                weights = {c: updates[c][0]["num_examples"] for c in who}
                for name in expert_names(merged, layer, expert):
                    if not who:
                        assert torch.equal(merged[name], previous[name])
                        continue
                    expected = sum(weights[c] * updates[c][1]["modules." + name].double() for c in who)
                    expected = (expected / sum(weights.values())).float()
                    torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7)
                    checked += 1
        assert checked > 0
        # each client's next start: the global experts with its own router
        for client, (_, tensors) in updates.items():
            start = load_file(root / f"round-{index + 1:03d}" / f"start-{client}.safetensors")
            router = "model.layers.0.mlp_adapter.router.weight"
            assert torch.equal(start[router], tensors["modules." + router])
            assert torch.equal(start[expert_names(merged, 0, 0)[0]], merged[expert_names(merged, 0, 0)[0]])
        aggregation = json.loads((root / f"round-{index + 1:03d}" / "aggregation.json").read_text())
        assert aggregation["accepted"] == ["code", "docs"] and aggregation["refused"] == {}
        assert all(size > 0 for size in aggregation["bytes_uploaded"].values())

    # each client's export: base + the last global experts + its own router, and the report
    import connito.models.loading  # noqa: F401  (registers Connito's model classes)

    for client, budget in (("code", 1), ("docs", 2)):
        model = AutoModelForCausalLM.from_pretrained(root / "export" / client / "hf")
        assert model.config.model_type == "connito_fft_moe" and model.config.adapter_top_k == budget
        start = load_file(root / "round-002" / f"start-{client}.safetensors")
        state = model.state_dict()
        assert all(torch.equal(state[f"base.{name}"], tensor) for name, tensor in start.items())
        assert all(torch.equal(state[f"base.{name}"], tensor) for name, tensor in base.items())
        assert (root / "export" / client / "adapters" / "adapters" / "manifest.json").is_file()
    report = json.loads((root / "federated_report.json").read_text())
    assert set(report["validation_loss"]) == {"base", "code (budget 1)", "docs (budget 2)"}
    assert all(set(row) >= {"code", "docs", "all"} for row in report["validation_loss"].values())
    assert [sorted(r) for r in report["bytes_uploaded_per_round"]] == [["code", "docs"]] * 2

    # a rerun runs nothing; a killed client of round 1 (its update gone) is rerun alone, then round 1 aggregated again
    def attempts():
        return {
            job.name: (read_state(root, job.name).attempt, read_state(root, job.name).started) for job in plan.jobs()
        }

    before = attempts()
    again = pipelines.connito(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert attempts() == before
    (root / "r1-docs" / "update" / "update.json").unlink()
    again = pipelines.connito(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    after = attempts()
    rerun = sorted(name for name in after if after[name] != before[name])
    assert rerun == ["aggregate-1", "export", "r1-docs"]
    assert (root / "r1-docs" / "update" / "update.json").is_file()


@pytest.mark.slow
@pytest.mark.slurm
def test_a_federated_round_as_slurm_arrays_through_sbatch(tmp_path, data_cache, slurm_cluster):
    args = pipelines.small("federated", tmp_path, data_cache, "slurm", "base.steps=4", "client_steps=2", "rounds=1",
                           "adapter.num_experts=4", "adapter.width=8", "eval_tokens=1024", "launcher.kind=slurm",
                           "launcher.poll_seconds=1")  # fmt: skip
    run = pipelines.connito(args, tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    root = tmp_path / "slurm"
    states = {job.name: read_state(root, job.name) for job in read_plan(root).jobs()}
    assert {s.status for s in states.values()} == {"done"} and all(s.slurm_job for s in states.values())
    arrays = {name: s.slurm_job.split("_")[0] for name, s in states.items()}
    assert arrays["r0-code"] == arrays["r0-docs"] != arrays["aggregate-0"]  # the clients: one array, in parallel
    aggregation = json.loads((root / "round-001" / "aggregation.json").read_text())
    assert aggregation["accepted"] == ["code", "docs"]
    assert (root / "federated_report.md").is_file()


def prepared_round(tmp_path, **changes):
    """A pipeline on a saved tiny base, its round-0 adapters drawn and both clients' round-0 jobs done: the code
    client (20 rows) sent all-1 tensors and routed expert 0 of layer 0 only, docs (60 rows) all-3 and experts 0, 1."""
    from connito.composition.fft_moe.server import write_update
    from connito.orchestration.federated import run_init
    from connito.orchestration.jobs import JobState, write_state
    from connito.orchestration.plan import write_plan
    from tests.composition.test_composition_fft_moe_server import save_base

    base = save_base(tmp_path / "base")
    cfg = config(tmp_path, **{"base.path": str(base), "rounds": 1, "adapter.num_experts": 2, "adapter.width": 2,
                              **changes})  # fmt: skip
    root = tmp_path / "fed"
    plan = plan_federated(cfg)
    write_plan(root, plan)
    write_state(root, JobState(job="init", status="done"))
    run_init(root)
    start = load_file(root / "round-000" / "global.safetensors")
    for client, rows, value, trained in (("code", 20, 1.0, [[5, 0], [0, 0]]), ("docs", 60, 3.0, [[5, 5], [0, 0]])):
        record = {"top_k": 1, "layers": [0, 1], "tokens_per_expert": trained}
        tensors = {n: torch.full_like(t, value) for n, t in start.items()}
        write_update(tensors, base, root / f"r0-{client}" / "update", client=client, num_examples=rows, record=record)
        write_state(root, JobState(job=f"r0-{client}", status="done"))
    return root, start


def test_the_aggregation_job_writes_the_weighted_experts_and_each_clients_own_router(tmp_path):
    from connito.orchestration.federated import AggregationRecord, run_aggregate

    root, start = prepared_round(tmp_path)
    record = run_aggregate(root, 0)
    assert record.accepted == ["code", "docs"] and record.contributors["0.0"] == ["code", "docs"]
    assert AggregationRecord.load(root / "round-001" / "aggregation.json") == record
    merged = load_file(root / "round-001" / "global.safetensors")
    e00, e01 = expert_names(merged, 0, 0), expert_names(merged, 0, 1)
    assert all(torch.equal(merged[n], torch.full_like(merged[n], (20 * 1.0 + 60 * 3.0) / 80)) for n in e00)
    assert all(torch.equal(merged[n], torch.full_like(merged[n], 3.0)) for n in e01)  # docs alone trained it
    assert all(torch.equal(merged[n], start[n]) for n in expert_names(merged, 1, 0))  # nobody: unchanged
    router = "model.layers.0.mlp_adapter.router.weight"
    for client, value in (("code", 1.0), ("docs", 3.0)):
        next_start = load_file(root / "round-001" / f"start-{client}.safetensors")
        assert torch.equal(next_start[router], torch.full_like(start[router], value))
        assert all(torch.equal(next_start[n], merged[n]) for n in e00)


def test_a_tampered_update_stops_the_round_unless_skip_refused_and_local_only_averages_nothing(tmp_path):
    from connito.composition.fft_moe.server import UpdateRefused
    from connito.orchestration.federated import run_aggregate
    from tests.composition.test_composition_fft_moe_server import tamper

    root, start = prepared_round(tmp_path / "stop")
    tamper(root / "r0-code" / "update")
    with pytest.raises(UpdateRefused, match="update of client 'code' refused: its package fails verification"):
        run_aggregate(root, 0)
    assert not (root / "round-001" / "global.safetensors").exists()

    root, start = prepared_round(tmp_path / "skip", skip_refused=True)
    tamper(root / "r0-code" / "update")
    record = run_aggregate(root, 0)
    assert record.accepted == ["docs"] and list(record.refused) == ["code"]
    code = load_file(root / "round-001" / "start-code.safetensors")
    router = "model.layers.0.mlp_adapter.router.weight"
    assert torch.equal(code[router], start[router])  # the refused client keeps the router it started the round with
    e00 = expert_names(code, 0, 0)
    assert all(torch.equal(code[n], torch.full_like(code[n], 3.0)) for n in e00)  # docs' experts only

    root, start = prepared_round(tmp_path / "local", local_only=True)
    run_aggregate(root, 0)
    for client, value in (("code", 1.0), ("docs", 3.0)):  # each client goes on with its own tensors, all of them
        own = load_file(root / "round-001" / f"start-{client}.safetensors")
        assert all(torch.equal(t, torch.full_like(t, value)) for t in own.values())
