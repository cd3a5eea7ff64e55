"""Layer 7, jobs over files: the streaming, resumable scoring job (:mod:`.job`, chunks
prepared in workers by :mod:`.chunks`), its result files (:mod:`.results`,
:mod:`.outputs`), one job per shard (:mod:`.shards`), the same stages on Ray
(:mod:`.ray`, :mod:`.ray_jobs`) and ``specs explain`` over a file
(:mod:`.explain_files`)."""
