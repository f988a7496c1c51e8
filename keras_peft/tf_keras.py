"""keras-peft on tf.keras (Keras 2) models: the public names (see the page "tf.keras and TFRS").

`keras_peft.wrap`, `report`, the strategies, `lora` and the deltas accept
tf.keras models directly; what differs from Keras 3 lives in
`keras_peft.backends.tf_keras`. This module keeps the names users import.
"""

from __future__ import annotations

from keras_peft.backends.tf_keras import (
    MixedKerasError,
    is_tf_keras_model,
    legacy_keras_active,
    require_legacy_keras,
)
from keras_peft.wrapped import tf_keras as _wrapped
from keras_peft.wrapped.tf_keras import TfKerasPeftModel

__all__ = [
    "MixedKerasError",
    "TfKerasPeftModel",
    "is_tf_keras_model",
    "legacy_keras_active",
    "require_legacy_keras",
]


def __getattr__(name):
    # Files saved before keras-peft 0.1's backends/ name this module as their
    # wrapped class's module (`keras_peft.tf_keras.PeftSequential`).
    return _wrapped.__getattr__(name)
