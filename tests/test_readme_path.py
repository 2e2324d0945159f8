"""The README's main path, end to end.

A BART checkpoint in a local folder -> `swap_encoder(path, layout)` -> `save_pretrained` (model and tokenizer) ->
loaded with the Auto classes and `trust_remote_code=True` in a Python process where `scrolls_ssm` cannot be imported
-> the same logits and the same `generate` output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from scrolls_ssm import swap_encoder
from tests.training_fixtures import write_tiny_bart

LAYOUTS = [["s4d", "attention"], ["mamba2", "mamba2"], ["gss", "mamba"]]
SSM_SIZES = dict(
    s4d_d_state=8, mamba_d_state=4, mamba2_d_state=8, mamba2_headdim=16, mamba2_chunk_size=8, gss_d_state=8
)
TEXTS = ["is it so? alpha beta gamma delta epsilon zeta eta theta", "is it so? kappa lambda"]


def test_swap_save_and_load_elsewhere_with_trust_remote_code(tmp_path):
    bart = write_tiny_bart(tmp_path / "bart", dropout=0.0)
    expected = {}
    for index, layout in enumerate(LAYOUTS):
        torch.manual_seed(index)
        model, tokenizer = swap_encoder(
            str(bart), layout, max_source_positions=128, return_tokenizer=True, **SSM_SIZES
        )
        model.eval()
        folder = tmp_path / f"swapped-{index}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**inputs, decoder_input_ids=torch.tensor([[2, 0, 5], [2, 0, 7]])).logits
        generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, num_beams=2)
        torch.save(logits, folder / "expected_logits.pt")
        expected[str(folder)] = generated.tolist()

        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"] == {
            "AutoConfig": "configuration_scrolls_ssm.ScrollsSSMConfig",
            "AutoModel": "modeling_scrolls_ssm.ScrollsSSMModel",
            "AutoModelForSeq2SeqLM": "modeling_scrolls_ssm.ScrollsSSMForConditionalGeneration",
        }

    script = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.modules["scrolls_ssm"] = None  # any `import scrolls_ssm` now raises ImportError
        from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer
        results = {{}}
        for folder in {list(expected)!r}:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
            assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
            assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "ScrollsSSMModel"
            model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
            # The folder's config names remote code, so the tokenizer (which reads the config) is told to trust it too.
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
            inputs = tokenizer({TEXTS!r}, return_tensors="pt", padding=True)
            with torch.no_grad():
                logits = model(**inputs, decoder_input_ids=torch.tensor([[2, 0, 5], [2, 0, 7]])).logits
            expected = torch.load(folder + "/expected_logits.pt")
            results[folder] = {{
                "max_logit_diff": (logits - expected).abs().max().item(),
                "generated": model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, num_beams=2).tolist(),
            }}
        print(json.dumps(results))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for folder, generated in expected.items():
        assert loaded[folder]["max_logit_diff"] == 0.0, folder
        assert loaded[folder]["generated"] == generated, folder
