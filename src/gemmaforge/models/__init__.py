"""Model families: one readable package per family (config + model), the parts they share
(``common``), and the literal table of families and presets (``registry``)."""
