"""keras-peft's low-rank adapters: settings (`config`), per-layer-kind arithmetic
(`kinds`) and the layer mixin (`layer`). `keras_peft.lora` is the way in."""

from keras_peft.adapters.config import AdapterConfig
from keras_peft.adapters.kinds import UnsupportedLayerError
from keras_peft.adapters.layer import (
    AdaptedLayer,
    check_adapter_name,
    is_adapted,
    pissa_factors,
)

__all__ = ["AdaptedLayer", "AdapterConfig", "UnsupportedLayerError", "check_adapter_name",
           "is_adapted", "pissa_factors"]
