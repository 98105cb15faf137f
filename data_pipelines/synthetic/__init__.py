"""data and tokenizers made here, nothing downloaded: the shapes set, benchmark-shaped sets, the tiny tokenizer,
shards with every kind of bad sample (testing).
"""
