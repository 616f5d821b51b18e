"""The toy model family: data generator, tokenizer builder, trainer, evaluation."""
