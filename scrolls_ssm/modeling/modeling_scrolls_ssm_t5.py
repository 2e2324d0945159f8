"""A T5-family encoder-decoder whose encoder mixes tokens with a per-layer choice of mixer, and the family's decoder.

    input_ids -> shared embeddings (no position table) -> dropout
              -> N x ScrollsSSMT5EncoderBlock [ RMS norm -> mixer -> residual ; T5's FFN (its own norm, residual) ]
              -> final RMS norm -> dropout
              -> transformers' T5 / mT5 / umT5 / LongT5 decoder stack, reused as it is -> lm_head

T5 blocks are pre-norm, and T5's attention adds a learned relative position bias instead of using a position table.
`attention` layers are transformers' own attention modules of the checkpoint's family (T5, mT5, umT5, LongT5 local
or transient-global), so an all-`attention` model computes exactly what the checkpoint computes; every other kind
is one of the toolkit's mixers (`mixers.MIXERS`), which need no position information. Parameter names follow the
BART family of this package (`encoder.layers.{i}.mixer`, `mixer_layer_norm`), so tools that walk the encoder's
mixers work on both. This file is copied next to saved checkpoints for `trust_remote_code` users: it imports only
torch, transformers and its sibling files.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.models.bart.modeling_bart import shift_tokens_right
from transformers.models.longt5.modeling_longt5 import (
    LongT5LocalAttention,
    LongT5Stack,
    LongT5TransientGlobalAttention,
    _get_local_attention_mask,
)
from transformers.models.mt5.modeling_mt5 import MT5Attention, MT5Stack
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerFF, T5LayerNorm, T5Stack
from transformers.models.umt5.modeling_umt5 import UMT5Attention, UMT5Stack
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_scrolls_ssm_t5 import ScrollsSSMT5Config
from .mixers import build_mixer
from .modeling_scrolls_ssm import (
    ScrollsSSMModelMixin,
    ScrollsSSMPreTrainedModel,
    _output_flags,
    _token_cross_entropy,
    as_encoder_output,
    seq2seq_lm_output,
    seq2seq_model_output,
)


class LongT5DecoderStack(LongT5Stack):
    """LongT5's decoder stack, which has only its eager attention: asked for another implementation (SDPA is the
    default elsewhere in the model), it keeps eager instead of refusing, so the whole model takes any setting."""

    def get_correct_attn_implementation(self, requested_attention, *args, **kwargs) -> str:
        return "eager"


# t5_family -> (full attention class, decoder stack class)
_FAMILY_MODULES = {
    "t5": (T5Attention, T5Stack),
    "mt5": (MT5Attention, MT5Stack),
    "umt5": (UMT5Attention, UMT5Stack),
    "longt5": (T5Attention, LongT5DecoderStack),
}
_LOCAL_ATTENTION = {"local": LongT5LocalAttention, "transient-global": LongT5TransientGlobalAttention}


def _shares_position_bias(config: ScrollsSSMT5Config) -> bool:
    """T5, mT5 and LongT5 compute one relative position bias and share it across layers; umT5 has one per layer."""
    return config.t5_family != "umt5"


def _build_attention(config: ScrollsSSMT5Config, layer_idx: int, owns_position_bias: bool) -> nn.Module:
    """The family's own attention module (parameters `q`, `k`, `v`, `o`, `relative_attention_bias`, ...)."""
    if config.encoder_attention_type in _LOCAL_ATTENTION:
        return _LOCAL_ATTENTION[config.encoder_attention_type](config, has_relative_attention_bias=owns_position_bias)
    attention_cls = _FAMILY_MODULES[config.t5_family][0]
    return attention_cls(config, has_relative_attention_bias=owns_position_bias, layer_idx=layer_idx)


def _clamp_inf_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    """T5's guard for float16 (its activations overflow there): infinities become the largest finite value."""
    if hidden_states.dtype == torch.float16 and torch.isinf(hidden_states).any():
        clamp = torch.finfo(hidden_states.dtype).max - 1000
        hidden_states = hidden_states.clamp(min=-clamp, max=clamp)
    return hidden_states


class ScrollsSSMT5EncoderBlock(GradientCheckpointingLayer):
    """T5's pre-norm encoder block with its self-attention replaced by any mixer:
    h + dropout(mixer(norm(h))), then T5's FFN sublayer (`ff`: norm, dense, dropout, residual)."""

    def __init__(self, config: ScrollsSSMT5Config, layer_idx: int, owns_position_bias: bool = False):
        super().__init__()
        self.kind = config.encoder_layer_types[layer_idx]
        self.mixer_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        if self.kind == "attention":
            self.mixer = _build_attention(config, layer_idx, owns_position_bias)
        else:
            self.mixer = build_mixer(config, layer_idx)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.ff = T5LayerFF(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attention_inputs: torch.Tensor | None,
        position_bias: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`attention_mask`: the (batch, seq) padding mask the state-space mixers take; `attention_inputs`: the
        mask in the form the family's attention takes; `position_bias`: the shared relative bias once computed.
        Returns the new hidden states, the position bias (to share) and attention probabilities (or None)."""
        normed = self.mixer_layer_norm(hidden_states)
        weights = None
        if self.kind == "attention":
            mixed, position_bias, weights = self._attend(normed, attention_inputs, position_bias, output_attentions)
        else:
            mixed = self.mixer(normed, attention_mask)
        hidden_states = _clamp_inf_fp16(hidden_states + self.dropout(mixed))
        hidden_states = _clamp_inf_fp16(self.ff(hidden_states))
        return hidden_states, position_bias, weights

    def _attend(self, normed, attention_inputs, position_bias, output_attentions):
        """Each family's attention module has its own calling convention; this is where they meet."""
        if isinstance(self.mixer, tuple(_LOCAL_ATTENTION.values())):
            outputs = self.mixer(
                normed, mask=attention_inputs, position_bias=position_bias, output_attentions=output_attentions
            )
            return outputs[0], outputs[1], outputs[2] if output_attentions else None
        if isinstance(self.mixer, UMT5Attention):
            mixed, weights = self.mixer(normed, attention_mask=attention_inputs)
            return mixed, None, weights
        return self.mixer(normed, mask=attention_inputs, position_bias=position_bias)


class ScrollsSSMT5PreTrainedModel(ScrollsSSMModelMixin, PreTrainedModel):
    config: ScrollsSSMT5Config
    config_class = ScrollsSSMT5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _auto_map_models = ("ScrollsSSMT5Model", "ScrollsSSMT5ForConditionalGeneration")
    _no_split_modules = ["ScrollsSSMT5EncoderBlock", "T5Block", "MT5Block", "UMT5Block", "LongT5Block"]
    _skip_keys_device_placement = ["cache"]
    # As T5: the relative position bias goes through the attention interface, which FlashAttention does not take.
    _supports_flash_attn = False
    _supports_sdpa = True
    _keep_in_fp32_modules = ["wo"]  # T5's FFN output projection overflows in float16
    _keep_in_fp32_modules_strict = ScrollsSSMPreTrainedModel._keep_in_fp32_modules_strict

    def _init_weights(self, module: nn.Module):
        """T5's initialization (Mesh TensorFlow's scales, `initializer_factor`) for the T5-family modules, found by
        their parameters so that every family's classes are covered; fan-in scaled normals for the mixers' linear
        layers, then the mixers' own `init_mixer_weights`."""
        factor = self.config.initializer_factor
        d_model, d_kv, heads = self.config.d_model, self.config.d_kv, self.config.num_heads
        if isinstance(module, nn.Linear):
            own_head = module is getattr(self, "lm_head", None) and not self.config.tie_word_embeddings
            # An output layer of its own starts as T5's does; every other linear layer fan-in scaled.
            init.normal_(module.weight, mean=0.0, std=factor * (1.0 if own_head else module.in_features**-0.5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=factor)
        elif "LayerNorm" in type(module).__name__ and getattr(module, "bias", None) is None:
            init.constant_(module.weight, factor)  # T5's RMS norms
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if all(hasattr(module, name) for name in ("q", "k", "v", "o")):
            init.normal_(module.q.weight, mean=0.0, std=factor * (d_model * d_kv) ** -0.5)
            init.normal_(module.k.weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.v.weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.o.weight, mean=0.0, std=factor * (heads * d_kv) ** -0.5)
            for name in ("relative_attention_bias", "global_relative_attention_bias"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name).weight, mean=0.0, std=factor * d_model**-0.5)
        if hasattr(module, "wo") and hasattr(module, "act"):  # T5's dense sublayers, gated or not
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name).weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.wo.weight, mean=0.0, std=factor * self.config.d_ff**-0.5)
        if hasattr(module, "init_mixer_weights"):
            module.init_mixer_weights()


class ScrollsSSMT5Encoder(ScrollsSSMT5PreTrainedModel):
    """Token embeddings (no position table), one block per entry of `config.encoder_layer_types`, a final RMS norm.

    The relative position bias of T5, mT5 and LongT5 lives in the first `attention` layer, which computes it once per
    forward; the later attention layers reuse it, as in T5. umT5's attention layers each have their own."""

    def __init__(self, config: ScrollsSSMT5Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        attention_layers = [i for i, kind in enumerate(config.encoder_layer_types) if kind == "attention"]
        owners = set(attention_layers if not _shares_position_bias(config) else attention_layers[:1])
        self.layers = nn.ModuleList(
            [ScrollsSSMT5EncoderBlock(config, i, owns_position_bias=i in owners) for i in range(config.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        r"""
        output_attentions: also return the attention probabilities of every `attention` layer that gives them (T5's
            full attention under `attn_implementation="eager"`, LongT5's local attention always), in layer order.
        output_hidden_states: also return what enters every layer, then the final (normed) output, as T5 does.
        """
        output_attentions, output_hidden_states, return_dict = _output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds` to the encoder.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        limit = self.config.max_source_positions
        if limit is not None and seq > limit:
            raise ValueError(
                f"The input has {seq} tokens but this model's config sets max_source_positions={limit}. Truncate "
                f"inputs in the data pipeline (max_source_length <= {limit}) or raise the limit: a T5-family encoder "
                "has no position table, so any limit works (`from_pretrained(path, max_source_positions=None)` lifts "
                "it)."
            )
        if attention_mask is not None and attention_mask.shape != (batch, seq):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, seq) = {(batch, seq)}."
            )

        attention_inputs = self._attention_inputs(inputs_embeds, attention_mask)
        hidden_states = self.dropout(inputs_embeds)
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        position_bias, shared = None, _shares_position_bias(self.config)
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, bias, weights = layer(
                hidden_states, attention_mask, attention_inputs, position_bias, output_attentions
            )
            if shared:
                position_bias = bias
            if output_attentions and weights is not None:
                all_attentions += (weights,)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )
        return output if return_dict else output.to_tuple()

    def _attention_inputs(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None):
        """The padding mask in the form the family's attention takes (None without attention layers): LongT5's local
        block mask, its plain mask for transient-global attention, or transformers' bidirectional mask."""
        if "attention" not in self.config.encoder_layer_types:
            return None
        kind = self.config.encoder_attention_type
        if kind == "full":
            return create_bidirectional_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
            )
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], device=inputs_embeds.device)
        if kind == "local":
            return _get_local_attention_mask(attention_mask, self.config.local_radius + 1, inputs_embeds.device)
        return attention_mask


def _build_decoder(config: ScrollsSSMT5Config) -> PreTrainedModel:
    """The family's own decoder stack, built as its ForConditionalGeneration builds it."""
    decoder_config = copy.deepcopy(config)
    decoder_config.is_decoder = True
    decoder_config.num_layers = config.num_decoder_layers
    decoder_config._attn_implementation_internal = None  # the stack picks its own (LongT5's: eager)
    return _FAMILY_MODULES[config.t5_family][1](decoder_config)


class ScrollsSSMT5Model(ScrollsSSMT5PreTrainedModel):
    """Shared embeddings, the swappable encoder and the family's decoder from `transformers`, reused as it is."""

    _tied_weights_keys = {
        "decoder.embed_tokens.weight": "shared.weight",
        "encoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: ScrollsSSMT5Config):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = ScrollsSSMT5Encoder(config)
        self.decoder = _build_decoder(config)
        self.post_init()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """The encoder and decoder always read the shared embedding; `config.tie_word_embeddings` is about the LM
        head only (transformers' default would untie these too when it is False)."""
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        return dict(self._tied_weights_keys)

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, value):
        self.shared = value
        self.encoder.set_input_embeddings(value)
        self.decoder.set_input_embeddings(value)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Seq2SeqModelOutput | tuple:
        output_attentions, output_hidden_states, return_dict = _output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "Pass `decoder_input_ids`, `decoder_inputs_embeds` or `labels`: a T5-family decoder starts from "
                f"decoder_start_token_id={self.config.decoder_start_token_id}, not from the shifted input."
            )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        else:
            encoder_outputs = as_encoder_output(encoder_outputs)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        output = seq2seq_model_output(decoder_outputs, encoder_outputs)
        return output if return_dict else output.to_tuple()


class ScrollsSSMT5ForConditionalGeneration(ScrollsSSMT5PreTrainedModel, GenerationMixin):
    """The seq2seq model: `ScrollsSSMT5Model` + the LM head: the shared embedding where `config.tie_word_embeddings`
    (T5 v1.0), else an output layer of its own, as in T5 v1.1 / Flan-T5 / mT5 checkpoints. The decoder output is scaled
    by d_model^-0.5 first where `config.scale_decoder_outputs`."""

    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}

    def __init__(self, config: ScrollsSSMT5Config):
        super().__init__(config)
        self.model = ScrollsSSMT5Model(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch, target_len)`, *optional*): target ids; -100 is ignored by the
            loss. When given without decoder inputs, the decoder inputs are the labels shifted right, starting with
            `decoder_start_token_id` (T5's pad token).
        num_items_in_batch (*optional*): as in `ScrollsSSMForConditionalGeneration`: the summed token loss divided by
            it, so that gradient-accumulated micro-batches add up to the loss of one big batch.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        sequence_output = outputs.last_hidden_state
        if self.config.scale_decoder_outputs:
            sequence_output = sequence_output * (self.config.d_model**-0.5)
        logits = self.lm_head(sequence_output)
        loss = None
        if labels is not None:
            loss = _token_cross_entropy(logits, labels.to(logits.device), num_items_in_batch)
        output = seq2seq_lm_output(loss, logits, outputs)
        return output if return_dict else output.to_tuple()

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


__all__ = [
    "ScrollsSSMT5Encoder",
    "ScrollsSSMT5EncoderBlock",
    "ScrollsSSMT5ForConditionalGeneration",
    "ScrollsSSMT5Model",
    "ScrollsSSMT5PreTrainedModel",
]
