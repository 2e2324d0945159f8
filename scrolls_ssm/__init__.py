"""scrolls-ssm: long-document seq2seq with state-space encoders, on the SCROLLS benchmark.

Importing the package registers the model with transformers' Auto classes, so `AutoConfig` and
`AutoModelForSeq2SeqLM` resolve `model_type="scrolls_ssm"` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .convert import load_tokenizer, swap_encoder
from .denoising import denoising_batches, denoising_loss, encoder_similarity, text_infilling
from .modeling.configuration_scrolls_ssm import MIXER_KINDS, ScrollsSSMConfig
from .modeling.configuration_scrolls_ssm_t5 import ScrollsSSMT5Config
from .modeling.mixers import MIXERS
from .modeling.modeling_scrolls_ssm import (
    ScrollsSSMEncoder,
    ScrollsSSMForConditionalGeneration,
    ScrollsSSMModel,
    ScrollsSSMPreTrainedModel,
)
from .modeling.modeling_scrolls_ssm_t5 import (
    ScrollsSSMT5ForConditionalGeneration,
    ScrollsSSMT5Model,
    ScrollsSSMT5PreTrainedModel,
)
from .optim import optimizer_cls_and_kwargs, ssm_param_groups
from .transfer import attention_teacher, distill_outputs, reuse_attention_weights, transfer_attention

__version__ = "0.1.0"

# Both model families: BART / LED bases (scrolls_ssm) and T5-family bases (scrolls_ssm_t5).
for _config, _model, _seq2seq in (
    (ScrollsSSMConfig, ScrollsSSMModel, ScrollsSSMForConditionalGeneration),
    (ScrollsSSMT5Config, ScrollsSSMT5Model, ScrollsSSMT5ForConditionalGeneration),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForSeq2SeqLM.register(_config, _seq2seq, exist_ok=True)
    # `save_pretrained` writes `auto_map` and copies the code files, so people without this package can load a saved
    # model with `trust_remote_code=True`.
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _seq2seq.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = [
    "MIXERS",
    "MIXER_KINDS",
    "ScrollsSSMConfig",
    "ScrollsSSMEncoder",
    "ScrollsSSMForConditionalGeneration",
    "ScrollsSSMModel",
    "ScrollsSSMPreTrainedModel",
    "ScrollsSSMT5Config",
    "ScrollsSSMT5ForConditionalGeneration",
    "ScrollsSSMT5Model",
    "ScrollsSSMT5PreTrainedModel",
    "attention_teacher",
    "denoising_batches",
    "denoising_loss",
    "distill_outputs",
    "encoder_similarity",
    "load_tokenizer",
    "optimizer_cls_and_kwargs",
    "reuse_attention_weights",
    "ssm_param_groups",
    "swap_encoder",
    "text_infilling",
    "transfer_attention",
]
