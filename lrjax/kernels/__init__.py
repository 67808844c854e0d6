"""Attention kernels, below ring attention and the dispatch (lrjax.attention); each imports only downward.

  mask         position-based mask rules, the block classifier, the index-alignment test
  reference    materialised softmax attention (the oracle)
  step         the Step interface (forward with lse, backward into accumulators) and its custom VJP
  blockwise    pure-JAX flash attention (any backend; the CPU path and every kernel's fallback)
  pallas_gpu   Pallas-Triton flash attention by position (GPU)
  splash       jax's TPU splash attention, exact for any positions via run-time sub-block classes
  dot_product  jax.nn.dot_product_attention (xla, cuDNN)
"""
