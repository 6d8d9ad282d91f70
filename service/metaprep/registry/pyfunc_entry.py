"""The MLflow "models from code" file of a registered adapted model (``jobs.adapt --register NAME``).

MLflow copies this file into the model and runs it on load, after putting the model's own copy of the
``metaprep`` package (its ``code_paths``) on ``sys.path``; nothing is unpickled.
"""

from mlflow.models import set_model

from metaprep.registry.pyfunc import AdaptedLanguageModel

set_model(AdaptedLanguageModel())
