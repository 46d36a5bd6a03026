"""Prefect flows: wiring only. The logic lives in ``pte/`` and the stages in ``dvc.yaml``; see ``pipeline.py``."""
