"""Data side of kakehashi: WebDataset shards -> rendered, tokenized, packed, collated micro-batches. One
sub-package per step of the data path:

    read/       shards (patterns, manifest, writing), shard_reader (streaming, resumable by byte offset), streams
                (one source's endless, rank- and worker-split, block-shuffled stream)
    image/      images (decode to uint8, resize; normalize runs on the device), patches (dynamic-resolution patches)
    render/     samples (a raw sample's checks), templates and chat_spans (rendered through its template), tokenize
                (ids and the loss mask), example (one tokenized example)
    batch/      pack, collate, batches (a loader worker: samples -> examples -> micro-batches), loader
                (MixtureLoader: workers, weighted mixture, exact resume, bad-sample limit)

Beside the path: tools/ (the `kakehashi data` commands: convert, verify, inspect, preview; `bench data`;
cli_common, what they share) and synthetic/ (data and tokenizers made here, nothing downloaded: the shapes set,
benchmark-shaped sets, the tiny tokenizer, shards with every kind of bad sample). errors (UsageError: bad command
input, the CLI prints one line and exits 2; TooManyBadSamples) and output (stdout carries a command's result only)
are the conventions train/ shares: the lowest layer, imported by both packages.
"""
