"""The papers' experiments end to end (design.md "Layers": above ``train`` and ``analysis``).

A study is a plan that reads like the paper's experiment section: the runs it needs (a config
each, with seed), the analyses it runs on them, and the paper's stated values with their place
in the paper. Runs live in a run store (:mod:`reslab.studies.store`).
"""
