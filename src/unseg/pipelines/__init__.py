"""The pipelines: each output kind's stages behind one interface (:mod:`.kind`, :mod:`.kinds`),
and the one folder pipeline every command runs (:mod:`.folder`)."""
