"""examples packed and collated into micro-batches by the loader's workers (pack, collate, batches), mixed and
resumable (loader.MixtureLoader).
"""
