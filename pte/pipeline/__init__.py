"""The pipeline: ``stages`` (what ``dvc.yaml`` runs), ``cli`` (the ``pte`` command), ``evaluate`` (every method under
every budget), ``plots``, ``tracking`` (MLflow, JSON lines, offline sync), ``registry`` and ``registry_model`` (the
registered model and its predictor). It wires the layers below and holds no method logic.
"""
