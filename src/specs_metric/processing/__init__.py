"""Layer 4, text and images as the model reads them: the CLIP BPE tokenizer
(:mod:`.tokenizer`), image decoding with size limits and the CLIP preprocessing
(:mod:`.transform`, configured by :mod:`.preprocess`), and cutting captions into detail
segments (:mod:`.segmentation`). Nothing here needs a model."""
