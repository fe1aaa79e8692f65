"""A client's FFT-MoE export: plain transformers (remote code, no Connito import) loads it and computes exactly what
the base with the client's adapters computes in Connito, on a dense and an MoE base."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.composition.fft_moe import AdapterSpec, adapter_state, install_adapters
from connito.composition.fft_moe.export import export_client
from tests.composition.test_composition_fft_moe import tiny
from tests.helpers import clean_env

LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[2])
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert "connito" not in sys.modules
torch.save(model(ids).logits, sys.argv[3])
"""


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_plain_transformers_loads_a_client_export_and_computes_the_adapted_logits(model_type, tmp_path):
    model = tiny(model_type)
    model.save_pretrained(tmp_path / "base")
    spec = AdapterSpec(num_experts=4, width=8, layers=(0, 2) if model.config.num_hidden_layers > 2 else (1,))
    adapters = install_adapters(model, spec, top_k=2)
    torch.manual_seed(3)
    with torch.no_grad():
        for adapter in adapters.values():
            for expert in adapter.experts:
                expert.up.weight.normal_(std=0.5)  # trained adapters: not zero, so the check means something
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()(ids).logits
    assert not torch.allclose(expected, base)
    out = export_client(tmp_path / "base", adapter_state(model), spec, 2, tmp_path / "client")
    assert (out / "modeling_connito_fft_moe.py").is_file()
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    done = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=clean_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)
    # and natively in Connito (registered classes, no remote code)
    import connito.models.loading  # noqa: F401  (registers Connito's model classes)

    native = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(native(ids).logits, expected)
