"""hftrain: one YAML recipe -> tokenizer, data stream, model, training, evaluation, export."""

__version__ = "0.1.0"
