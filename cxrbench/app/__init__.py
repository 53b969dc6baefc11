"""The upload-and-explain app: the Voila dashboard's widgets (:mod:`.dashboard`), the demo (:mod:`.demo`), and
the Voila template, config and dashboard notebook shipped as package data."""
