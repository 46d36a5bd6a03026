"""The registered policy as MLflow "models from code" (``docs/pipeline.md``, "The registered model").

:func:`pte.pipeline.registry.register` logs this file (by path) as the pyfunc model; MLflow runs it when the model is
loaded, and :func:`mlflow.models.set_model` hands it the predictor. The logged model therefore holds source code and
settings, never a pickled Python object. Its settings (cache, sampling, prompt) come from the model's ``model_config``,
read in :meth:`pte.pipeline.registry.PTEPredictor.load_context`.
"""

from __future__ import annotations

import mlflow

from pte.pipeline.registry import PTEPredictor

mlflow.models.set_model(PTEPredictor())
