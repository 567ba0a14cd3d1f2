"""The block engine, split by concern: capture of block inputs (:mod:`.capture`), activation
streams and their deviation from the dense model (:mod:`.streams`) and memory accounting
(:mod:`.accounting`); :class:`sdsx.model.driver.BlockDriver` composes them."""
