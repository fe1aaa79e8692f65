"""The causal driver scan finds a planted driver, scores an unused expert 0, measures what it says it measures, and
gives the same numbers batched and unbatched.

The planted model (tiny Qwen3-MoE, no top-k renormalisation, small random init so that the planted paths dominate):
hidden dim 0 is on for every token, dim 1 is +3 for domain A's tokens (ids 10..41) and -3 for domain B's (64..127).
Expert 3 of layer 1 has router row ``10 * e1`` (every A token chooses it with weight ~1, no B token ever does) and
writes ``e2`` into the residual; the LM head raises A's tokens by ``0.5 * e2``. Without it A's text is as
unpredictable as B's: it is the one expert A relies on. Expert 6 of layer 2 has router row ``-10 * e0``: no token
ever chooses it. Attention and the other experts write nothing into dims 0..2.
"""

import pytest
import torch

from connito.analysis.drivers import DriverScores, driver_scan
from connito.experts import ExpertView
from connito.training.losses import domain_sums, token_cross_entropy
from tests.experts.conftest import build_tiny

DOMAIN_A, DOMAIN_B = range(10, 42), range(64, 128)
DRIVER, UNUSED = (1, 3), (2, 6)


def planted_model():
    model = build_tiny("qwen3_moe", tie_word_embeddings=False, initializer_range=0.05)
    assert model.config.norm_topk_prob is False
    view = ExpertView(model)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, :3] = 0.0
        embed[:, 0] = 3.0
        embed[list(DOMAIN_A), 1] = 3.0
        embed[list(DOMAIN_B), 1] = -3.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:3] = 0.0
            layer.mlp.experts.down_proj[:, :3] = 0.0
        router = view.router_weight(DRIVER[0])
        router[DRIVER[1]] = 0.0
        router[DRIVER[1], 1] = 10.0
        driver = view.read_expert(DRIVER)
        width = driver["down_proj"].shape[1]
        driver["gate_up_proj"].zero_()
        driver["gate_up_proj"][:, 1] = 1.0  # gate and up read dim 1: silu(x1) * x1 ~ 31 for A's tokens
        driver["down_proj"].zero_()
        driver["down_proj"][2] = 4.0 / (width * 31)  # writes ~4 * e2
        view.write_expert(DRIVER, driver)
        router = view.router_weight(UNUSED[0])
        router[UNUSED[1]] = 0.0
        router[UNUSED[1], 0] = -10.0
        head = model.lm_head.weight
        head[:, :3] = 0.0
        head[list(DOMAIN_A), 2] = 0.5
    return model


def domain_batches(num_batches: int = 2, rows: int = 4, seq: int = 32):
    """Rows of A's tokens (domain 0) then rows of B's (domain 1), uniformly random within each range."""
    generator = torch.Generator().manual_seed(0)
    batches, domains = [], []
    for _ in range(num_batches):
        a = torch.randint(DOMAIN_A.start, DOMAIN_A.stop, (rows, seq), generator=generator)
        b = torch.randint(DOMAIN_B.start, DOMAIN_B.stop, (rows, seq), generator=generator)
        batches.append(torch.cat([a, b]))
        domains.append(torch.cat([torch.zeros(rows, seq), torch.ones(rows, seq)]).long())
    return batches, domains


@pytest.fixture(scope="module")
def planted_scan() -> DriverScores:
    batches, domains = domain_batches()
    return driver_scan(planted_model(), batches, domains, progress=False)


def test_planted_driver_ranks_first_for_its_domain_and_the_unused_expert_scores_zero(planted_scan):
    scores = planted_scan
    (first, first_score), (_, second_score) = scores.ranking(0, by="abs_score")[:2]
    assert first == DRIVER
    assert first_score > 0.1 and first_score > 100 * abs(second_score)
    assert scores.score_DLE[0][DRIVER] > 0  # boosting it lowers A's loss: a driver, not a harm
    assert scores.delta_loss_up_DLE[0][DRIVER] < 0 < scores.delta_loss_down_DLE[0][DRIVER]
    assert scores.ranking(0, by="importance")[0][0] == DRIVER
    assert abs(scores.score_DLE[1][DRIVER]) < 1e-6  # B's tokens never choose it
    for domain in (0, 1):
        assert abs(scores.score_DLE[domain][UNUSED]) < 1e-6
        assert abs(scores.importance_DLE[domain][UNUSED]) < 1e-6
    assert scores.scanned_LE.all() and not scores.score_DLE.isnan().any()
    assert scores.tokens_D.tolist() == [2 * 4 * 31, 2 * 4 * 31]


def test_scan_numbers_equal_losses_of_the_reweighted_models_by_hand(planted_scan):
    """Without renormalisation, scaling the driver's routing weight by f is scaling its down_proj by f: the scan's
    mean losses per domain equal token_cross_entropy of those models, computed here independently; its KL equals
    KL(reference || scaled) by hand."""
    batches, domains = domain_batches()

    def per_domain(model) -> tuple[torch.Tensor, torch.Tensor]:
        total, count, logps = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), []
        with torch.no_grad():
            for input_ids, domain_ids in zip(batches, domains):
                logits = model(input_ids).logits
                loss_sum, n = domain_sums(token_cross_entropy(logits, input_ids), domain_ids, 2)
                total, count = total + loss_sum, count + n
                logps.append(logits[:, :-1].float().log_softmax(dim=-1))
        return total / count, torch.cat(logps)

    reference, reference_logp = per_domain(planted_model())
    torch.testing.assert_close(planted_scan.loss_D, reference, rtol=1e-6, atol=1e-6)
    for factor, delta, kl in (
        (2.0, planted_scan.delta_loss_up_DLE, planted_scan.kl_up_DLE),
        (0.5, planted_scan.delta_loss_down_DLE, planted_scan.kl_down_DLE),
    ):
        model = planted_model()
        with torch.no_grad():
            model.model.layers[DRIVER[0]].mlp.experts.down_proj[DRIVER[1]] *= factor
        loss, logp = per_domain(model)
        torch.testing.assert_close(delta[:, DRIVER[0], DRIVER[1]], loss - reference, rtol=1e-4, atol=1e-6)
        kl_tokens = (reference_logp.exp() * (reference_logp - logp)).sum(dim=-1)  # [rows, S-1], A rows first
        kl_a = kl_tokens[torch.cat([d[:, 1:] for d in domains]) == 0].double().mean()
        torch.testing.assert_close(kl[0, DRIVER[0], DRIVER[1]], kl_a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_batched_scan_equals_one_perturbation_per_forward(family):
    """experts_per_forward 1 (2 copies per forward) and 3 (6 copies, a ragged last chunk) on a random model with
    three domains mixed within rows: every number agrees to 1e-6."""
    model = build_tiny(family)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 128, (3, 24), generator=generator) for _ in range(2)]
    domains = [torch.randint(0, 3, (3, 24), generator=generator) for _ in range(2)]
    domains[0][0, :5] = -1  # not counted: targets 1..4 (position 0 is never a target)
    experts = [(0, 1), (1, 2), (1, 7), (2, 0), (2, 5)]
    one = driver_scan(model, batches, domains, experts=experts, experts_per_forward=1, progress=False)
    many = driver_scan(model, batches, domains, experts=experts, experts_per_forward=3, progress=False)
    assert sorted(map(tuple, one.scanned_LE.nonzero().tolist())) == experts
    assert one.tokens_D.sum() == 2 * 3 * 23 - 4
    for field in ("delta_loss_up_DLE", "delta_loss_down_DLE", "kl_up_DLE", "kl_down_DLE"):
        a, b = getattr(one, field), getattr(many, field)
        assert torch.equal(a.isnan(), ~one.scanned_LE.expand_as(a))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, equal_nan=True)
    assert one.score_DLE.nan_to_num().abs().max() > 1e-4  # the experts do matter on this random model


def test_bad_factors_and_inputs_are_refused_with_the_allowed_range():
    model = build_tiny("qwen3_moe")
    batches, domains = [torch.randint(3, 128, (2, 8))], [torch.zeros(2, 8, dtype=torch.long)]
    cases = [
        ({"factor_up": 1.0}, r"factor_up must be a finite number > 1 \(it boosts the expert's weight\), got 1.0"),
        ({"factor_down": 1.0}, r"factor_down must be in \[0, 1\) \(it suppresses the expert's weight\), got 1.0"),
        ({"factor_down": -0.5}, r"factor_down must be in \[0, 1\)"),
        ({"experts_per_forward": 0}, "experts_per_forward must be an integer >= 1"),
        ({"experts": [(5, 0)]}, "layer 5 is out of range"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            driver_scan(model, batches, domains, progress=False, **kwargs)
    with pytest.raises(ValueError, match=r"domain ids have shape \(2, 7\), the input ids \(2, 8\)"):
        driver_scan(model, batches, [torch.zeros(2, 7, dtype=torch.long)], progress=False)
