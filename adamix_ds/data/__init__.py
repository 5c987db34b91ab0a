"""The data layer: reading sources, tokenization with loss masks, batching, tokenizer loading and the embedded
default task. Nothing here knows about mixtures."""
