"""The studies behind the README's tables, built on the library (which never imports them):

- :mod:`.toy`: the paper's 2D toy experiment (``autoguide toy``); :mod:`.toy_search`: the guide
  search over it (``autoguide toy --search``).
- :mod:`.digits`: the digits feature classifier and its metrics (FD_digits, precision, recall,
  alignment; ``autoguide eval``, ``autoguide classifier``).
- :mod:`.digits_experiment` and :mod:`.digits_study`: guidance on the embedded digits set
  (``autoguide experiment digits|digits-seeds``).
- :mod:`.sweep`: guidance sweeps over snapshots or any denoisers (``autoguide sweep``).
- :mod:`.cells` (one cache of finished cells) and :mod:`.plots` (the sweeps' figures).
"""
