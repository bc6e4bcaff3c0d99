"""The registered model's pyfunc flavour: `mlflow.pyfunc.load_model(...).predict(...)`
generates text from a fine-tuned Hugging Face checkpoint stored in the version's artifacts.

    mlflow.set_tracking_uri("sqlite:///mlflow/mlflow.db")   # the project's store, or a server
    model = mlflow.pyfunc.load_model("models:/ftpipe-dates@champion")
    model.predict(pd.DataFrame({"instruction": ["Convert 1991-03-13 to words."]}))
"""

from __future__ import annotations

import mlflow.pyfunc


class TextGenerator(mlflow.pyfunc.PythonModel):
    # The version carries an explicit signature (registry.log_model): skip MLflow's
    # type-hint-based validation and its warning that predict() has no type hints.
    _skip_type_hint_validation = True
    max_new_tokens = 48

    def load_context(self, context) -> None:
        from ftpipe.evaluation.generation import load_for_eval

        self.model, self.tokenizer = load_for_eval(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from ftpipe.data.formatting import prompt_of
        from ftpipe.evaluation.generation import generate

        if isinstance(model_input, pd.DataFrame):
            rows = model_input.to_dict(orient="records")
        elif isinstance(model_input, dict):
            rows = [model_input]
        else:
            rows = [{"instruction": str(x)} for x in list(model_input)]
        prompts = [prompt_of(r) for r in rows]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return generate(self.model, self.tokenizer, prompts, max_new)
