"""The bundled demo models (``specs-synth-demo`` and its contrastive twin
``clip-synth-demo``): their recipe on the synthetic world (:mod:`.recipe`: settings,
fine-tuning arms, evaluation, export) and the grounded pre-training of their start
(:mod:`.grounding`). Experiments built on the training loop and the benchmarks, so this
layer sits above both."""
