"""read shards: patterns, manifests and writing (shards), streaming by byte offset (shard_reader), one source's
endless, rank- and worker-split, block-shuffled stream (streams).
"""
