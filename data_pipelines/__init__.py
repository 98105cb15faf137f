"""Data side of kakehashi: WebDataset shards -> rendered, tokenized, collated micro-batches.

shards (tar I/O) -> samples (checks, decode via images, render via templates) -> tokenize -> collate, driven by
loader.MixtureLoader. synth and tiny_tokenizer give a dataset and tokenizer that need no downloads; commands adds
`kakehashi data synth|preview`.
"""
