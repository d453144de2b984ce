"""The compression core: pure tensor code, SymInt-safe, with no ``torch.library``, no model code
and no cache class.

* ``layout``: the compressed cache layouts (``CompressedKV``, dense and packed entries, pack/unpack).
* ``prefill``: one site's prefill compression (score, select, gather), and every layer's at once.
* ``decoding``: decode-time eviction of dense and packed layers.
* ``lookahead``: LAQ's second stage on one layer.
* ``lowrank``: KQ-SVD's calibrated projections and the maths applied to cached entries.
* ``attention``: the reference reader of the packed layout.

The methods (``kvc_compile.methods``) say what each token is worth; this package decides nothing
about which kernels run (the ops hand them in, ``kvc_compile.methods.kernels``).
"""
