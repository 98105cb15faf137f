"""Data side of kakehashi: WebDataset shards -> rendered, tokenized, collated micro-batches.

shards (writing, patterns, manifest) / shard_reader (streaming, resumable by offset) -> streams (one source's
endless, split, block-shuffled stream per reader slot) -> batches (worker side: samples checks, images decode to
uint8, templates render, tokenize, collate) -> loader.MixtureLoader (DataLoader workers, weighted mixture, exact
resume, bad-sample limit). images.normalize runs on the training device. synth, bench and tiny_tokenizer give data
and a tokenizer that need no downloads; testing writes shards holding every kind of bad sample. commands adds
`kakehashi data synth|preview|convert|verify|inspect` (convert, verify); bench adds `kakehashi bench data`;
cli_common holds what those command modules share. errors: UsageError (bad command input; the CLI prints
one line and exits 2) and TooManyBadSamples.
"""
