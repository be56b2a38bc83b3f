"""Front ends of ALGNet for host applications (napari, ComfyUI) on top of ``algnet_core``."""
