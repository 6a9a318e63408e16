"""Corpus importers: one module per corpus, each turning a directory tree into a Manifest."""
