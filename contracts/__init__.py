"""What the stages share: the feature spec, the canonical dataset, the raw-input builders,
the model manifest, the index store's pointer, and the error tree.

Imports no TensorFlow and no Faiss (tests/test_layout.py keeps it so): training, the
indexer and the service all depend on it, and it on none of them.
"""
