"""Layer 2, where work runs: devices and precisions with the device batch policy
(:mod:`.policy`), torchrun process groups and sharding (:mod:`.distributed`), worker
processes that die with their parent (:mod:`.workers`) and strict fp32 on CUDA
(:mod:`.numerics`)."""
