"""Demos and their material: ``make demo`` (``demo.py``), the demo data set (``demo_data.py``) and tiny
pruned models built on the fly for tests and smoke runs (``tiny.py``)."""
