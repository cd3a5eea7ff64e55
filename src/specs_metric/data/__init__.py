"""Layer 3, data in: rows of every input format (:mod:`.sources` dispatches to
:mod:`.text`, :mod:`.tables`, :mod:`.webdataset`, :mod:`.coco`, :mod:`.hf_folders`), the
one image-cell resolver (:mod:`.images`), benchmark tables (:mod:`.records`) and score
files read back (:mod:`.scorefiles`)."""
