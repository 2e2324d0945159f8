"""scrolls-ssm: long-document seq2seq with state-space encoders, on the SCROLLS benchmark.

Importing the package registers the model with transformers' Auto classes, so `AutoConfig` and
`AutoModelForSeq2SeqLM` resolve `model_type="scrolls_ssm"` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .convert import load_tokenizer, swap_encoder
from .denoising import denoising_batches, denoising_loss, encoder_similarity, text_infilling
from .modeling.configuration_scrolls_ssm import MIXER_KINDS, ScrollsSSMConfig
from .modeling.mixers import MIXERS
from .modeling.modeling_scrolls_ssm import (
    ScrollsSSMEncoder,
    ScrollsSSMForConditionalGeneration,
    ScrollsSSMModel,
    ScrollsSSMPreTrainedModel,
)
from .optim import optimizer_cls_and_kwargs, ssm_param_groups
from .transfer import attention_teacher, distill_outputs, reuse_attention_weights, transfer_attention

__version__ = "0.1.0"

AutoConfig.register(ScrollsSSMConfig.model_type, ScrollsSSMConfig, exist_ok=True)
AutoModel.register(ScrollsSSMConfig, ScrollsSSMModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(ScrollsSSMConfig, ScrollsSSMForConditionalGeneration, exist_ok=True)
# `save_pretrained` writes `auto_map` and copies the code files, so people without this package can load a saved
# model with `trust_remote_code=True`.
ScrollsSSMConfig.register_for_auto_class()
ScrollsSSMModel.register_for_auto_class("AutoModel")
ScrollsSSMForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = [
    "MIXERS",
    "MIXER_KINDS",
    "ScrollsSSMConfig",
    "ScrollsSSMEncoder",
    "ScrollsSSMForConditionalGeneration",
    "ScrollsSSMModel",
    "ScrollsSSMPreTrainedModel",
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
