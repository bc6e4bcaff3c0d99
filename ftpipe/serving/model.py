"""The registered model's pyfunc flavour: `mlflow.pyfunc.load_model(...).predict(...)`
generates text from a version's weights: its full checkpoint, or its adapter on the base it
pins (fetched once from the registry's base store into this machine's cache, verified).

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

        arts = context.artifacts
        if "adapter" in arts:
            from ftpipe.registry.bases import fetch_base, read_ref

            self.model, self.tokenizer = load_for_eval(str(fetch_base(read_ref(arts["base"]))),
                                                       adapter=arts["adapter"])
        else:
            self.model, self.tokenizer = load_for_eval(arts["model"])

    def _prompt(self, row: dict, prompt_of) -> str:
        """A conversation (messages) through the tokenizer's chat template, ending with the
        assistant's turn; an instruction (and input) as the alpaca prompt it trained on."""
        messages = row.get("messages")
        if messages is not None and not isinstance(messages, (float, str)) and len(messages):   # NaN: none
            return self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt_of(row)

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
        prompts = [self._prompt(r, prompt_of) for r in rows]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return generate(self.model, self.tokenizer, prompts, max_new)
