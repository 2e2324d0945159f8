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
from torch.nn import functional as F
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
from transformers.utils.deprecation import deprecate_kwarg

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

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, seq, d_model) -> (the same shape, the mixer's attention probabilities or None). Only `attention`
        mixers have probabilities to give; state-space mixers have none."""
        dropout = nn.functional.dropout
        residual = hidden_states
        weights = None
        if output_attentions and getattr(self.mixer, "returns_attentions", False):
            mixed, weights = self.mixer(hidden_states, attention_mask, output_attentions=True)
        else:
            mixed = self.mixer(hidden_states, attention_mask)
        hidden_states = dropout(mixed, p=self.dropout, training=self.training)
        hidden_states = self.mixer_layer_norm(residual + hidden_states)

        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = dropout(self.fc2(hidden_states), p=self.dropout, training=self.training)
        hidden_states = self.final_layer_norm(residual + hidden_states)

        if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
            clamp = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = hidden_states.clamp(min=-clamp, max=clamp)
        return hidden_states, weights


class ScrollsSSMModelMixin:
    """What every model family of this package adds to `PreTrainedModel`:

    - `save_pretrained` names both model classes of the family in `config.json`'s `auto_map`, whichever one is saved,
      so `AutoConfig`, `AutoModel` and `AutoModelForSeq2SeqLM` all load the folder with `trust_remote_code=True`
      (when the classes are registered for the Auto API, which importing `scrolls_ssm` does);
    - `attn_implementation="flash_attention_2"` without the kernel falls back to SDPA instead of downloading one.
    """

    _auto_map_models: tuple[str, str]  # (the AutoModel class, the AutoModelForSeq2SeqLM class), in this file

    def save_pretrained(self, save_directory, *args, **kwargs):
        if type(self)._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            base, seq2seq = self._auto_map_models
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": f"{module}.{base}",
                "AutoModelForSeq2SeqLM": f"{module}.{seq2seq}",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

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


class ScrollsSSMPreTrainedModel(ScrollsSSMModelMixin, PreTrainedModel):
    config: ScrollsSSMConfig
    config_class = ScrollsSSMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _auto_map_models = ("ScrollsSSMModel", "ScrollsSSMForConditionalGeneration")
    _no_split_modules = ["ScrollsSSMEncoderBlock", "BartDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _keys_to_ignore_on_load_unexpected = ["encoder.version", "decoder.version"]
    _supports_flash_attn = True
    _supports_sdpa = True
    # The forward has no data-dependent control flow, so `generate` may compile it with a static cache.
    _can_compile_fullgraph = True
    # `from_pretrained(..., dtype=torch.bfloat16 / float16)` keeps the state-space dynamics in float32 (transformers'
    # dtype plan searches these regexes in parameter names): bf16 rounding of A_imag, dt and C moves an S4D kernel by
    # ~30%. `model.to(dtype)` still casts everything (docs/mixers.md, "Precision").
    _keep_in_fp32_modules_strict = [
        r"mixer\.ssm\.(log_dt|log_A_real|A_imag|C|D)$",  # s4d and gss (BidirectionalS4D)
        r"mixer\.(forward|backward)_ssm\.(A_log|D|dt_proj\.bias)$",  # mamba
        r"mixer\.(A_log|D|dt_bias)$",  # mamba2
    ]

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        # Mixers with their own initialization (state-space parameters, ...) run it after their children got the
        # generic one: transformers visits children before parents.
        if hasattr(module, "init_mixer_weights"):
            module.init_mixer_weights()
        if isinstance(module, ScrollsSSMForConditionalGeneration):
            nn.init.zeros_(module.final_logits_bias)


class ScrollsSSMEncoder(ScrollsSSMPreTrainedModel):
    """Token embeddings + learned positions up to `config.max_source_positions` (none with
    `config.encoder_positions="none"`), then one block per entry of `config.encoder_layer_types`."""

    def __init__(self, config: ScrollsSSMConfig):
        super().__init__(config)
        self.dropout = config.dropout
        self.layerdrop = config.encoder_layerdrop
        self.max_source_positions = config.max_source_positions
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = BartScaledWordEmbedding(
            config.vocab_size, config.d_model, config.pad_token_id, embed_scale=embed_scale
        )
        self.embed_positions = (
            BartLearnedPositionalEmbedding(config.max_source_positions, config.d_model)
            if config.encoder_positions == "learned"
            else None
        )
        self.layers = nn.ModuleList([ScrollsSSMEncoderBlock(config, i) for i in range(config.encoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()

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
        output_attentions: also return the attention probabilities of every full-attention layer, in layer order:
            one `(batch, heads, seq, seq)` tensor per `attention` layer. State-space layers (and block-local
            attention) have no probabilities, so they add no entry. None: `config.output_attentions`.
        output_hidden_states: also return the embeddings and every layer's output (`encoder_layers + 1` tensors).
            None: `config.output_hidden_states`.
        """
        output_attentions, output_hidden_states, return_dict = _output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds` to the encoder.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        if seq > self.max_source_positions:
            fix = (
                "or convert with a larger `max_source_positions`"
                if self.embed_positions is not None
                else "or raise `config.max_source_positions` (this encoder has no position table, so any limit works)"
            )
            raise ValueError(
                f"The input has {seq} tokens but this encoder takes at most max_source_positions="
                f"{self.max_source_positions}. Truncate inputs in the data pipeline (max_source_length <= "
                f"{self.max_source_positions}), {fix}."
            )
        if attention_mask is not None and attention_mask.shape != (batch, seq):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, seq) = {(batch, seq)}."
            )

        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(inputs_embeds[:, :, -1]).to(inputs_embeds.device)
        hidden_states = self.layernorm_embedding(hidden_states)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if not (self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop):
                hidden_states, weights = layer(hidden_states, attention_mask, output_attentions)
                if weights is not None:
                    all_attentions += (weights,)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)

        output = BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )
        return output if return_dict else output.to_tuple()


def _output_flags(
    config: ScrollsSSMConfig, output_attentions: bool | None, output_hidden_states: bool | None, return_dict
) -> tuple[bool, bool, bool]:
    """Each flag as given, else the config's value (as every transformers model resolves them)."""
    return (
        config.output_attentions if output_attentions is None else output_attentions,
        config.output_hidden_states if output_hidden_states is None else output_hidden_states,
        config.return_dict if return_dict is None else return_dict,
    )


def as_encoder_output(encoder_outputs: BaseModelOutput | tuple) -> BaseModelOutput:
    """Precomputed encoder outputs as `generate` or a user passes them: a `BaseModelOutput`, or a tuple of
    (last hidden state, hidden states, attentions) with the later entries optional."""
    if isinstance(encoder_outputs, BaseModelOutput):
        return encoder_outputs
    return BaseModelOutput(
        last_hidden_state=encoder_outputs[0],
        hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
        attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
    )


def seq2seq_model_output(decoder_outputs, encoder_outputs: BaseModelOutput) -> Seq2SeqModelOutput:
    """The base model's output from its decoder's and encoder's (every model family of this package)."""
    return Seq2SeqModelOutput(
        last_hidden_state=decoder_outputs.last_hidden_state,
        cache=decoder_outputs.cache,
        decoder_hidden_states=decoder_outputs.hidden_states,
        decoder_attentions=decoder_outputs.attentions,
        cross_attentions=decoder_outputs.cross_attentions,
        encoder_last_hidden_state=encoder_outputs.last_hidden_state,
        encoder_hidden_states=encoder_outputs.hidden_states,
        encoder_attentions=encoder_outputs.attentions,
    )


def seq2seq_lm_output(loss, logits: torch.Tensor, outputs: Seq2SeqModelOutput) -> Seq2SeqLMOutput:
    """The seq2seq LM's output: the loss and logits, and everything else the base model gave."""
    return Seq2SeqLMOutput(
        loss=loss,
        logits=logits,
        cache=outputs.cache,
        decoder_hidden_states=outputs.decoder_hidden_states,
        decoder_attentions=outputs.decoder_attentions,
        cross_attentions=outputs.cross_attentions,
        encoder_last_hidden_state=outputs.encoder_last_hidden_state,
        encoder_hidden_states=outputs.encoder_hidden_states,
        encoder_attentions=outputs.encoder_attentions,
    )


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
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        else:
            encoder_outputs = as_encoder_output(encoder_outputs)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        output = seq2seq_model_output(decoder_outputs, encoder_outputs)
        return output if return_dict else output.to_tuple()


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

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """As `PreTrainedModel.resize_token_embeddings`, and BART's logits bias follows the new vocabulary size (new
        tokens get a zero bias)."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        size = embeddings.weight.shape[0]
        bias = self.final_logits_bias[:, :size]
        if size > bias.shape[1]:
            bias = torch.cat([bias, bias.new_zeros(1, size - bias.shape[1])], dim=1)
        self.final_logits_bias = nn.Buffer(bias)
        return embeddings

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
            loss. When given without decoder inputs, the decoder inputs are the labels shifted right.
        num_items_in_batch (*optional*): the number of target tokens in the whole (gradient-accumulated, all
            processes) batch, as transformers' Trainer passes it. The loss is then the summed token cross-entropy
            divided by it, so that accumulated micro-batches add up to the loss of one big batch. Without it, the loss
            is the mean over this call's target tokens.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
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
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state) + self.final_logits_bias.to(outputs.last_hidden_state.device)
        loss = None
        if labels is not None:
            loss = _token_cross_entropy(logits, labels.to(logits.device), num_items_in_batch)
        output = seq2seq_lm_output(loss, logits, outputs)
        return output if return_dict else output.to_tuple()

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


def _token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy in float32 over the target tokens (label -100 is ignored): their mean, or their sum divided by
    `num_items_in_batch` when that is given."""
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


__all__ = [
    "ScrollsSSMEncoder",
    "ScrollsSSMEncoderBlock",
    "ScrollsSSMForConditionalGeneration",
    "ScrollsSSMModel",
    "ScrollsSSMPreTrainedModel",
]
