"""Configuration of hftrain's recurrent causal language models (LSTM, GRU, Elman RNN).

Self-contained: imports only transformers, so it ships next to the weights as remote code.
"""

from transformers import PretrainedConfig

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


class RecurrentLMConfig(PretrainedConfig):
    """A stack of recurrent layers between a token embedding and a (tied) output projection.

    Args:
        vocab_size: tokens in the vocabulary.
        cell: `lstm`, `gru`, `rnn_tanh` or `rnn_relu` (Elman RNN).
        embedding_size: width of the token embedding (and of the output projection's input).
        hidden_size: width of each recurrent layer's state.
        num_layers: stacked recurrent layers.
        embedding_dropout: dropout on the embedded tokens.
        dropout: dropout between recurrent layers.
        output_dropout: dropout on the last layer's output, before the vocabulary projection.
        tie_word_embeddings: share the embedding with the output layer; when hidden_size differs
            from embedding_size, a linear projection maps the RNN output to embedding_size.
        initializer_range: embeddings and the output layer are drawn from U(-r, r).
        use_cache: return the recurrent state from `forward` (generation feeds it back).
    """

    model_type = "hftrain_recurrent"
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(
        self,
        vocab_size: int = 10000,
        cell: str = "lstm",
        embedding_size: int = 200,
        hidden_size: int = 200,
        num_layers: int = 2,
        embedding_dropout: float = 0.0,
        dropout: float = 0.2,
        output_dropout: float = 0.2,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.1,
        use_cache: bool = True,
        **kwargs,
    ):
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        self.vocab_size = vocab_size
        self.cell = cell
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.embedding_dropout = embedding_dropout
        self.dropout = dropout
        self.output_dropout = output_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
