"""An encoder-decoder whose encoder mixes tokens with a per-layer choice of mixer, and BART's decoder.

    input_ids -> shared embeddings + learned positions (up to `max_source_positions`) -> LayerNorm
              -> N x ScrollsSSMEncoderBlock [ mixer (attention | s4d | mamba | mamba2 | gss) -> FFN ]
              -> transformers' BartDecoder (cross-attention, cache, everything) -> lm_head tied to the embeddings

Parameter names follow BART's, so a BART checkpoint maps onto this model by renaming `self_attn` to `mixer` (see
`convert.swap_encoder`). This file is copied next to saved checkpoints for `trust_remote_code` users: it imports only
torch, transformers and its sibling files.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.models.bart.modeling_bart import (
    BartDecoder,
    BartLearnedPositionalEmbedding,
    BartScaledWordEmbedding,
    shift_tokens_right,
)
from transformers.utils import logging

from .configuration_scrolls_ssm import ScrollsSSMConfig
from .mixers import build_mixer

logger = logging.get_logger(__name__)


class ScrollsSSMEncoderBlock(GradientCheckpointingLayer):
    """BART's post-norm encoder layer with its self-attention replaced by any mixer: mixer -> add & norm -> FFN -> add
    & norm. The FFN and both norms keep BART's names (`fc1`, `fc2`, `final_layer_norm`)."""

    def __init__(self, config: ScrollsSSMConfig, layer_idx: int):
        super().__init__()
        self.kind = config.encoder_layer_types[layer_idx]
        self.mixer = build_mixer(config, layer_idx)
        self.mixer_layer_norm = nn.LayerNorm(config.d_model)
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        dropout = nn.functional.dropout
        residual = hidden_states
        hidden_states = dropout(self.mixer(hidden_states, attention_mask), p=self.dropout, training=self.training)
        hidden_states = self.mixer_layer_norm(residual + hidden_states)

        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = dropout(self.fc2(hidden_states), p=self.dropout, training=self.training)
        hidden_states = self.final_layer_norm(residual + hidden_states)

        if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
            clamp = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = hidden_states.clamp(min=-clamp, max=clamp)
        return hidden_states


class ScrollsSSMPreTrainedModel(PreTrainedModel):
    config: ScrollsSSMConfig
    config_class = ScrollsSSMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScrollsSSMEncoderBlock", "BartDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _keys_to_ignore_on_load_unexpected = ["encoder.version", "decoder.version"]
    _supports_flash_attn = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        # Mixers with their own initialization (state-space parameters, ...) run it after their children got the
        # generic one: transformers visits children before parents.
        if hasattr(module, "init_mixer_weights"):
            module.init_mixer_weights()
        if isinstance(module, ScrollsSSMForConditionalGeneration):
            nn.init.zeros_(module.final_logits_bias)

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, **kw
    ):
        # Asking for flash_attention_2 without flash-attn (or without CUDA) would make transformers try to download a
        # kernel from the Hub. Fall back to SDPA, which gives the same numbers, and say so once.
        if attn_implementation == "flash_attention_2" and not (
            importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
        ):
            logger.warning_once(
                "attn_implementation='flash_attention_2' needs the `flash-attn` package and a CUDA device; "
                "using 'sdpa' instead (same results). Install `scrolls-ssm[flash]` on a GPU machine to use it."
            )
            attn_implementation = "sdpa"
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check=is_init_check, **kw)


class ScrollsSSMEncoder(ScrollsSSMPreTrainedModel):
    """Token embeddings + learned positions up to `config.max_source_positions`, then one block per entry of
    `config.encoder_layer_types`."""

    def __init__(self, config: ScrollsSSMConfig):
        super().__init__(config)
        self.dropout = config.dropout
        self.layerdrop = config.encoder_layerdrop
        self.max_source_positions = config.max_source_positions
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = BartScaledWordEmbedding(
            config.vocab_size, config.d_model, config.pad_token_id, embed_scale=embed_scale
        )
        self.embed_positions = BartLearnedPositionalEmbedding(config.max_source_positions, config.d_model)
        self.layers = nn.ModuleList([ScrollsSSMEncoderBlock(config, i) for i in range(config.encoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds` to the encoder.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        if seq > self.max_source_positions:
            raise ValueError(
                f"The input has {seq} tokens but this encoder has learned positions for max_source_positions="
                f"{self.max_source_positions}. Truncate inputs in the data pipeline (max_source_length <= "
                f"{self.max_source_positions}), or convert with a larger `max_source_positions`."
            )
        if attention_mask is not None and attention_mask.shape != (batch, seq):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, seq) = {(batch, seq)}."
            )

        hidden_states = inputs_embeds + self.embed_positions(inputs_embeds[:, :, -1]).to(inputs_embeds.device)
        hidden_states = self.layernorm_embedding(hidden_states)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden_states = layer(hidden_states, attention_mask)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if return_dict is False:
            return tuple(v for v in (hidden_states, all_hidden_states) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


class ScrollsSSMModel(ScrollsSSMPreTrainedModel):
    """Shared embeddings, the swappable encoder and BART's decoder from `transformers`, reused as it is."""

    _tied_weights_keys = {
        "decoder.embed_tokens.weight": "shared.weight",
        "encoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: ScrollsSSMConfig):
        super().__init__(config)
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.shared = BartScaledWordEmbedding(
            config.vocab_size, config.d_model, config.pad_token_id, embed_scale=embed_scale
        )
        self.encoder = ScrollsSSMEncoder(config)
        self.decoder = BartDecoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, value):
        self.shared = value
        self.encoder.embed_tokens = self.shared
        self.decoder.embed_tokens = self.shared

    def get_encoder(self):
        return self.encoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass `decoder_input_ids`, `decoder_inputs_embeds`, `labels` or `input_ids`.")
            # As BART: without decoder inputs, the decoder reconstructs the input shifted right (denoising).
            decoder_input_ids = shift_tokens_right(
                input_ids, self.config.pad_token_id, self.config.decoder_start_token_id
            )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_hidden_states=output_hidden_states,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
            )
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            past_key_values=decoder_outputs.past_key_values,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
        )


class ScrollsSSMForConditionalGeneration(ScrollsSSMPreTrainedModel, GenerationMixin):
    """The seq2seq model: `ScrollsSSMModel` + an LM head tied to the shared embeddings (+ BART's logits bias)."""

    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}
    _keys_to_ignore_on_load_missing = ["final_logits_bias"]

    def __init__(self, config: ScrollsSSMConfig):
        super().__init__(config)
        self.model = ScrollsSSMModel(config)
        self.final_logits_bias = nn.Buffer(torch.zeros((1, self.model.shared.num_embeddings)))
        self.lm_head = nn.Linear(config.d_model, self.model.shared.num_embeddings, bias=False)
        self.post_init()

    def get_encoder(self):
        return self.model.encoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, target_len)`, *optional*): target ids; -100 is ignored by the
            loss. When given without decoder inputs, the decoder inputs are the labels shifted right.
        """
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = shift_tokens_right(
                    labels, self.config.pad_token_id, self.config.decoder_start_token_id
                )
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state) + self.final_logits_bias.to(outputs.last_hidden_state.device)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, logits.shape[-1]).float(), labels.to(logits.device).view(-1))
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
        )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


__all__ = [
    "ScrollsSSMEncoder",
    "ScrollsSSMEncoderBlock",
    "ScrollsSSMForConditionalGeneration",
    "ScrollsSSMModel",
    "ScrollsSSMPreTrainedModel",
]
