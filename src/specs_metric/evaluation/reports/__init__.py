"""Reports of evaluations: markdown, JSON and PNG (:mod:`.report`), and self-contained HTML
pages (:mod:`.html`, built from :mod:`.html_parts`)."""
