"""The one exception type the library raises for bad input: a message that says what to do."""


class AdapterError(ValueError):
    """Bad input to vlm_adapters (a config, a model, a prompt, a saved directory)."""
