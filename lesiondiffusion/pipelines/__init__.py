"""The inference pipelines of the three synthesis stages, importable in one process (design 2, 4).

- :mod:`.preprocess` (:class:`~.preprocess.PreprocessRunner`): requests (:mod:`.preprocess_inputs`) ->
  standardised CT, organ map (:mod:`.segment`), reports and boxes -> manifest; :mod:`.prepare`: a labelled
  dataset -> training set;
- :mod:`.lmnet` (:class:`~.lmnet.LesionMaskSynthesiser`): boxes -> lesion masks (inputs :mod:`.mask_inputs`,
  thresholds :mod:`.mask_postprocess`);
- :mod:`.linet` (:class:`~.linet.LesionInpainter`): masks -> lesion intensities pasted into the original CT.

The bundles' ``configs/*.json`` build these classes; the bundles' ``scripts/`` keep only training glue.
"""
