"""The model: what `save_pretrained` copies next to a checkpoint for `trust_remote_code` users.

The files here are flat and import each other relatively (transformers' remote-code loader resolves `from .x import`
only inside one folder), and they import nothing else from this package: the toolkit imports the model, never the
reverse.
"""

from .configuration_scrolls_ssm import MIXER_KINDS, ScrollsSSMConfig
from .configuration_scrolls_ssm_t5 import T5_FAMILIES, ScrollsSSMT5Config
from .mixers import MIXERS, build_mixer
from .modeling_scrolls_ssm import (
    ScrollsSSMEncoder,
    ScrollsSSMEncoderBlock,
    ScrollsSSMForConditionalGeneration,
    ScrollsSSMModel,
    ScrollsSSMPreTrainedModel,
)
from .modeling_scrolls_ssm_t5 import (
    ScrollsSSMT5Encoder,
    ScrollsSSMT5EncoderBlock,
    ScrollsSSMT5ForConditionalGeneration,
    ScrollsSSMT5Model,
    ScrollsSSMT5PreTrainedModel,
)

__all__ = [
    "MIXERS",
    "MIXER_KINDS",
    "ScrollsSSMConfig",
    "ScrollsSSMEncoder",
    "ScrollsSSMEncoderBlock",
    "ScrollsSSMForConditionalGeneration",
    "ScrollsSSMModel",
    "ScrollsSSMPreTrainedModel",
    "ScrollsSSMT5Config",
    "ScrollsSSMT5Encoder",
    "ScrollsSSMT5EncoderBlock",
    "ScrollsSSMT5ForConditionalGeneration",
    "ScrollsSSMT5Model",
    "ScrollsSSMT5PreTrainedModel",
    "T5_FAMILIES",
    "build_mixer",
]
