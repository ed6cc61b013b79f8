__version__ = "0.1.0"

# Version of the on-disk checkpoint layout (slmkit.json manifest + safetensors). Bump it when the
# layout changes incompatibly; loaders refuse checkpoints newer than they understand.
CHECKPOINT_FORMAT_VERSION = 1
