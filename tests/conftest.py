"""Shared fixtures: tiny configs, a random-init BART checkpoint and a tokenizer trained in-process (no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(
    vocab_size=120,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    dropout=0.0,
)


def tiny_config(**overrides):
    from scrolls_ssm import ScrollsSSMConfig

    fields = {**TINY, "max_source_positions": 256, **overrides}
    if "encoder_layer_types" in overrides and "encoder_layers" not in overrides:
        fields["encoder_layers"] = len(overrides["encoder_layer_types"])
    return ScrollsSSMConfig(**fields)


def tiny_model(**overrides):
    from scrolls_ssm import ScrollsSSMForConditionalGeneration

    torch.manual_seed(0)
    return ScrollsSSMForConditionalGeneration(tiny_config(**overrides)).eval()


def train_tokenizer(texts: list[str], vocab_size: int = 120):
    """A byte-level BPE tokenizer with BART's special tokens (<s>=0, <pad>=1, </s>=2, <unk>=3), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


@pytest.fixture(scope="session")
def tokenizer():
    words = "the cat sat on a mat while long documents about state space models were read by people".split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    return train_tokenizer(texts)


@pytest.fixture
def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(**TINY)).eval()


def import_benchmark(name: str):
    """A script of benchmarks/ as a module (the benchmarks are scripts, not a package), for a module-scoped fixture:
    `yield from import_benchmark("encoder_scaling")`."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(folder)


def remote_code_loss(model_dir: Path, input_ids, mask, labels, work_dir: Path) -> float:
    """The loss of the saved model at `model_dir` on the batch, computed in a fresh process where `scrolls_ssm`
    cannot be imported at all: `AutoModelForSeq2SeqLM` with `trust_remote_code=True`, offline."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["scrolls_ssm"] = None  # any `import scrolls_ssm` now raises ImportError
        from transformers import AutoModelForSeq2SeqLM
        model = AutoModelForSeq2SeqLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids, mask = torch.tensor({input_ids.tolist()}), torch.tensor({mask.tolist()})
        labels = torch.tensor({labels.tolist()})
        with torch.no_grad():
            print(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item())
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(work_dir / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=work_dir, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return float(result.stdout.strip().splitlines()[-1])
