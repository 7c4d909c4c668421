"""Recurrent (LSTM/GRU/RNN) causal LMs, registered with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from hftrain.models.recurrent.configuration_recurrent import CELLS, RecurrentLMConfig
from hftrain.models.recurrent.modeling_recurrent import RecurrentForCausalLM

AutoConfig.register(RecurrentLMConfig.model_type, RecurrentLMConfig, exist_ok=True)
AutoModelForCausalLM.register(RecurrentLMConfig, RecurrentForCausalLM, exist_ok=True)

__all__ = ["CELLS", "RecurrentForCausalLM", "RecurrentLMConfig"]
