"""LoRA Lab: train LoRAs inside ComfyUI. Node registration only; the engine lives in trainer/."""

# ComfyUI imports this folder as a package (under a mangled name: relative imports only). pytest
# also imports this file when it walks the repository, as a plain module with no parent package;
# there is nothing to register then.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    WEB_DIRECTORY = "./web"
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
