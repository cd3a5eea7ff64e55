"""Layer 5, the model: configurations as data (:mod:`.config`, named architectures in
:mod:`.archs`), the LongCLIP towers (:mod:`.model`, fused CPU kernels in :mod:`.fused`),
prefix-sharing text encoding (:mod:`.prefix`), building a model from weights
(:mod:`.factory`), and reading weights from every supported format (:mod:`.weights`)."""
