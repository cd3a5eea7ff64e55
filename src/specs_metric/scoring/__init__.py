"""Layer 6, scores: the :class:`~.scorer.Scorer` and :func:`~.scorer.load`, image
embeddings by content (:mod:`.image_embeddings`, over the disk cache of :mod:`.cache`), the
scales and the one cosine (:mod:`.scales`), row preparation shared by every command
(:mod:`.prepare`), the accumulating metric (:mod:`.metric`) and per-segment attribution
(:mod:`.explain`)."""
