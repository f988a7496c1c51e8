"""The class a wrapped model gets, one per Keras (see `keras_peft.model.PeftModel`)."""
