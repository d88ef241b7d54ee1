"""ComfyUI node classes (V1 API): thin forms over the engine in trainer/."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
