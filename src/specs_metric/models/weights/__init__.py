"""Weights from files, folders and named models, without running pickled code: one entry
point (:func:`.loading.read_checkpoint`), the containers (:mod:`.checkpoint`,
:mod:`.torchscript`, :mod:`.hf`), the download registry (:mod:`.pretrained`) and what a file
may make us allocate (:mod:`.limits`)."""
