"""Errors the engine raises for users.

Every error names the input that is wrong, what was expected and what to do, because the message
ends up in a ComfyUI node error box, not in a developer's terminal.
"""


class LoRALabError(Exception):
    """Base class for errors meant to be shown to the user as they are."""


class ConfigError(LoRALabError, ValueError):
    """An input value is out of range or inconsistent.

    `field` is the user-facing input name (the node widget), so a node can point at it.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class TrainingError(LoRALabError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the last good state is kept."""
