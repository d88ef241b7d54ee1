"""LoRA Lab: train LoRAs inside ComfyUI. Node registration only; the engine lives in trainer/.

ComfyUI imports this folder as a package under a mangled name: relative imports only.
"""

try:
    import folder_paths  # noqa: F401  (exists only inside a ComfyUI process)
except ImportError:
    # Imported outside ComfyUI (pytest walks the repository, whose root is this pack): there is
    # nothing to register, and the nodes' ComfyUI imports would fail.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
