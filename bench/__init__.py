"""The benchmark (DESIGN.md §2): ``harness`` (serving measurements), ``sasrec`` (the RecBole baseline; MostPop
is ``recdata.metrics.mostpop_ranks``), ``run`` (profiles, ``prunerec bench``, ``prunerec compare``) and
``report`` (tables, plots, paired tests). The scripts beside them run as ``python -m bench.<script>``.
"""
