"""hftrain's recurrent causal language models as `transformers` models.

Self-contained: imports only torch, transformers and its sibling configuration file, so that
`save_pretrained` can copy it next to the weights and `AutoModelForCausalLM.from_pretrained(
path, trust_remote_code=True)` loads it where hftrain is not installed.

Training runs the fused `nn.LSTM` / `nn.GRU` / `nn.RNN` kernels (cuDNN on GPU) over whole
sequences. The recurrent state is the model's cache: `forward` takes it and returns the
updated one, so `generate()` feeds one new token per step and the cost of a token does not
grow with the prefix. transformers renamed the cache from `past_key_values` to `cache` (5.2x):
`forward` and `prepare_inputs_for_generation` take either name, and the output carries it
under the name this transformers' `generate()` reads (`CACHE_KEY`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_recurrent import RecurrentLMConfig

_RNN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}

# The recurrent state: (h, c) for an LSTM, (h,) otherwise; each (num_layers, batch, hidden).
RecurrentState = tuple[torch.Tensor, ...]

CACHE_KEY = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
             else "past_key_values")
"""The name under which this version of transformers passes a model's cache around."""


def recurrent_cache(output: CausalLMOutputWithPast) -> RecurrentState | None:
    """The state after the last token of `output` (under either name of the cache)."""
    return getattr(output, CACHE_KEY, None)


class RecurrentPreTrainedModel(PreTrainedModel):
    config_class = RecurrentLMConfig
    base_model_prefix = "model"
    _is_stateful = True
    _no_split_modules = ["LSTM", "GRU", "RNN"]  # the recurrent stack: FSDP's unit

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the recurrent state, not key/value pairs

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        r = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            module.weight.uniform_(-r, r)
        elif isinstance(module, nn.Linear):
            module.weight.uniform_(-r, r)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
            # PyTorch's default U(-1/sqrt(H), 1/sqrt(H)), as the classic word-level example uses
            bound = module.hidden_size ** -0.5
            for weight in module.parameters():
                weight.uniform_(-bound, bound)


class RecurrentForCausalLM(RecurrentPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: RecurrentLMConfig):
        super().__init__(config)
        rnn_class = _RNN_CLASSES[config.cell]
        extra = {"nonlinearity": config.cell[4:]} if config.cell.startswith("rnn_") else {}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embedding_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.rnn = rnn_class(
            config.embedding_size,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            **extra,  # seq-first: on CPU the batch-first layout costs ~3% of a step in copies
        )
        self.output_dropout = nn.Dropout(config.output_dropout)
        tied = config.tie_word_embeddings
        self.projection = (  # maps the RNN output to the tied embedding's width
            nn.Linear(config.hidden_size, config.embedding_size, bias=False)
            if tied and config.hidden_size != config.embedding_size else None
        )
        head_width = config.embedding_size if tied else config.hidden_size
        self.lm_head = nn.Linear(head_width, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        cache: RecurrentState | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,  # accepted for the generate() contract;
        past_key_values: RecurrentState | None = None,  # the cache's name before 5.2x
        **kwargs,  # a recurrent model reads every token it is given
    ) -> CausalLMOutputWithPast:
        """Logits for every position; with `labels` (shifted inside, -100 ignored) the loss;
        with `use_cache` (default: the config's) the state after the last token."""
        hidden = self.embedding_dropout(self.embed_tokens(input_ids.t()))  # (T, B, E)
        given = cache if cache is not None else past_key_values
        state = None
        if given is not None:
            state = given if self.config.cell == "lstm" else given[0]
        output, new_state = self.rnn(hidden, state)  # (T, B, H)
        output = self.output_dropout(output)
        if self.projection is not None:
            output = self.projection(output)  # (T, B, E)
        logits = self.lm_head(output).transpose(0, 1)  # (B, T, V): a view, no copy
        loss = None
        if labels is not None:
            loss = self.loss_function(  # transformers' loss views the logits: make them dense
                logits.contiguous(), labels, vocab_size=self.config.vocab_size, **kwargs
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        else:
            cache = new_state if isinstance(new_state, tuple) else (new_state,)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: cache})

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, past_key_values: RecurrentState | None = None,
        use_cache: bool | None = None, cache: RecurrentState | None = None, **kwargs,
    ) -> dict:
        """The first step reads the prompt; later steps only the newest token and the state."""
        state = cache if cache is not None else past_key_values
        if state is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "cache": state, "use_cache": use_cache}

    def _reorder_cache(self, past_key_values: RecurrentState, beam_idx: torch.Tensor):
        return tuple(s.index_select(1, beam_idx.to(s.device)) for s in past_key_values)


RecurrentLMConfig.register_for_auto_class()
RecurrentForCausalLM.register_for_auto_class("AutoModelForCausalLM")
