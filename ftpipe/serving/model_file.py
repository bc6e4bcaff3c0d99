"""The model-from-code file MLflow stores with every registered version (no pickle):
loading the version runs this file, which names the pyfunc model to serve."""
from mlflow.models import set_model

from ftpipe.serving.model import TextGenerator

set_model(TextGenerator())
